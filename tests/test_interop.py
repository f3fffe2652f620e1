"""nanochat and Hugging Face interop: nanochat's own files import to nanochat's logits and greedy
text, exports load back (and in torch/transformers where installed) to the same logits, and no
file can run code or be half-loaded."""
import dataclasses
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiktoken

from launch import export as export_launcher
from launch import import_nanochat as import_launcher
from nanochat_jax import model as model_lib
from nanochat_jax.checkpoint import Checkpointer, checkpoint_dir
from nanochat_jax.config import load_config
from nanochat_jax.conversation import render_conversation, render_for_completion
from nanochat_jax.data.shards import DEMO_DIR, iter_documents
from nanochat_jax.engine import Engine
from nanochat_jax.interop import hf, nanochat
from nanochat_jax.interop.torch_files import BadCheckpointFile, UnsafeFileError, read_pt, write_pt
from nanochat_jax.loading import load_model
from nanochat_jax.tokenizer import SPECIAL_TOKENS, load_tokenizer, split_for_training, train_tokenizer
from nanochat_jax.tokenizer_tiktoken import TiktokenTokenizer

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "nanochat_base_dir"
CKPT = FIXTURE / "base_checkpoints" / "d2"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
SAMPLE_TEXTS = ["Hello world", "  leading\n\n\tnumbers 1234567 and ünïcödé 日本語 🎉", "don't I'LL we've",
                "def f(x):\n    return x ** 2\n", ""]


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    return tmp_path / "base"


@pytest.fixture(scope="module")
def fixture_tokenizer():
    return TiktokenTokenizer(nanochat.read_tokenizer_pickle(FIXTURE / "tokenizer" / "tokenizer.pkl"))


def logits_of(loaded, *prompts):
    """Logits of each prompt, from one call on the right-padded batch (causal: padding is unseen)."""
    width = max(map(len, prompts))
    batch = jnp.array([ids + [0] * (width - len(ids)) for ids in prompts])
    forward = jax.jit(lambda params, idx: model_lib.forward(loaded.graphdef, params, idx))  # traced afresh
    logits = np.asarray(forward(loaded.params, batch))
    return [row[:len(ids)] for row, ids in zip(logits, prompts)]


# ---- importing nanochat's own files -------------------------------------------------------------

def test_import_gives_nanochat_logits_tokens_and_greedy_text(base_dir, monkeypatch):
    summary = nanochat.import_checkpoint(FIXTURE, "base")
    assert summary["step"] == 150 and summary["tag"] == "d2"
    loaded = load_model("base", tag="d2")
    tok = loaded.tokenizer
    assert isinstance(tok, TiktokenTokenizer) and loaded.model_cfg.vocab_size == 4096
    expected_logits = np.load(FIXTURE / "expected_logits.npz")
    engine = Engine(loaded.graphdef, loaded.params, loaded.model_cfg, tok, buckets=(32,))
    prompts = [tok.encode(prompt, prepend="<|bos|>") for prompt in EXPECTED["prompts"]]
    assert prompts == EXPECTED["prompt_ids"]
    # our rotary tables are fp32, nanochat stores its cos/sin in bf16: the only difference
    for i, logits in enumerate(logits_of(loaded, *prompts)):
        assert np.abs(logits - expected_logits[f"prompt{i}"]).max() < 5e-3
    for i, ids in enumerate(prompts):
        rows, _ = engine.generate_batch(ids, num_samples=1, max_tokens=24, temperature=0.0)
        assert rows[0][len(ids):] == EXPECTED["greedy_continuations"][i]
        assert tok.decode(rows[0][len(ids):]) == EXPECTED["greedy_texts"][i]
    tables = model_lib.rotary_tables
    monkeypatch.setattr(model_lib, "rotary_tables", lambda *a: tuple(
        t.astype(jnp.bfloat16).astype(jnp.float32) for t in tables(*a)))
    for i, logits in enumerate(logits_of(loaded, *prompts)):  # with nanochat's bf16 tables: fp32 agreement
        np.testing.assert_allclose(logits, expected_logits[f"prompt{i}"], atol=2e-5, rtol=0)


def test_imported_checkpoint_refuses_another_tiktoken_vocabulary(base_dir, fixture_tokenizer):
    """Two merges that trade ranks: the same size and special tokens, but another vocabulary."""
    nanochat.import_checkpoint(FIXTURE, "base")
    directory = checkpoint_dir("base", "d2")
    assert load_model("base", tag="d2").step == 150  # the hash survives the tokenizer's save and load
    enc = fixture_tokenizer.encoding
    ranks = dict(enc._mergeable_ranks)
    a, b = (token for token, rank in ranks.items() if rank in (300, 301))
    ranks[a], ranks[b] = ranks[b], ranks[a]
    swapped = tiktoken.Encoding(name=enc.name, pat_str=enc._pat_str, mergeable_ranks=ranks,
                                special_tokens=enc._special_tokens)
    TiktokenTokenizer(swapped).save(directory / "tokenizer")
    with pytest.raises(ValueError, match=r"d2/tokenizer/tiktoken\.json .* is not the tokenizer the checkpoint "
                                         r".*base/d2/150 was trained with"):
        load_model("base", tag="d2")

@pytest.mark.slow  # compiles the engine at chat_cli's buckets
def test_imported_model_serves_through_a_stage_launcher(base_dir, capsys):
    from launch import chat_cli
    import_launcher.main([f"--from={CKPT}", f"--tokenizer={FIXTURE / 'tokenizer'}", "--stage=sft", "--tag=nano"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["directory"].endswith("sft/nano")
    assert chat_cli.main(["-i", "sft", "-p", "The capital of France is", "-t", "0", "-m", "8"]) == 0
    assert "Assistant:" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="already holds a checkpoint"):
        import_launcher.main([f"--from={CKPT}", "--tokenizer", str(FIXTURE / "tokenizer"), "--stage=sft",
                              "--tag=nano"])


def test_pt_reader_matches_torch(tmp_path):
    torch = pytest.importorskip("torch")
    reference = torch.load(CKPT / "model_000150.pt", weights_only=True)
    ours = read_pt(CKPT / "model_000150.pt")
    assert list(ours) == list(reference)
    for key, tensor in reference.items():
        np.testing.assert_array_equal(ours[key], tensor.numpy())
    mixed = {"bf16": torch.randn(5, 3).to(torch.bfloat16), "strided": torch.arange(12.0).reshape(3, 4).t(),
             "offset": torch.arange(10, dtype=torch.int64)[3:7], "empty": torch.zeros(0, 4)}
    torch.save(mixed, tmp_path / "mixed.pt")
    read = read_pt(tmp_path / "mixed.pt")
    for key, tensor in mixed.items():
        np.testing.assert_array_equal(np.asarray(read[key], np.float64), tensor.to(torch.float64).numpy())


def test_written_pt_loads_in_torch_with_weights_only(tmp_path):
    torch = pytest.importorskip("torch")
    arrays = {"a.weight": np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32),
              "b": np.arange(7, dtype=np.int32)}
    write_pt(tmp_path / "model_000001.pt", arrays)
    loaded = torch.load(tmp_path / "model_000001.pt", weights_only=True)
    assert list(loaded) == list(arrays)
    for key, array in arrays.items():
        np.testing.assert_array_equal(loaded[key].numpy(), array)
    write_pt(tmp_path / "one.pt", arrays["b"])
    np.testing.assert_array_equal(torch.load(tmp_path / "one.pt", weights_only=True).numpy(), arrays["b"])


class _Payload:
    """Unpickling this makes a directory: the stand-in for code an attacker would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _malicious_pt(path, marker):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("model_000001/data.pkl", pickle.dumps({"transformer.wte.weight": _Payload(marker)}, protocol=2))
        z.writestr("model_000001/byteorder", "little")


def test_malicious_pickles_run_nothing(tmp_path):
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(_Payload(live)))  # the payload is real: plain pickle runs it
    assert live.is_dir()
    marker = tmp_path / "pwned"
    _malicious_pt(tmp_path / "model_000001.pt", marker)
    with pytest.raises(UnsafeFileError, match="posix.mkdir|os.mkdir"):
        read_pt(tmp_path / "model_000001.pt")
    (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UnsafeFileError, match="mkdir"):
        nanochat.read_tokenizer_pickle(tmp_path / "tokenizer.pkl")
    assert not marker.exists()


def test_truncated_or_corrupt_pt_gives_a_clear_error(tmp_path, base_dir):
    data = (CKPT / "model_000150.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadCheckpointFile, match="truncated"):
        read_pt(tmp_path / "truncated.pt")
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # inside a storage: the zip's CRC catches it
    (tmp_path / "flipped.pt").write_bytes(bytes(flipped))
    with pytest.raises(BadCheckpointFile, match="corrupt"):
        read_pt(tmp_path / "flipped.pt")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(CKPT, ckpt)
    (ckpt / "model_000150.pt").write_bytes(data[:1000])
    with pytest.raises(SystemExit, match="^error: .*truncated"):
        import_launcher.main([f"--from={ckpt}", f"--tokenizer={FIXTURE / 'tokenizer'}"])


def test_later_nanochat_architectures_are_refused_by_name(tmp_path, base_dir):
    state = read_pt(CKPT / "model_000150.pt")
    ckpt = tmp_path / "base_checkpoints" / "d2"
    shutil.copytree(CKPT, ckpt)
    shutil.copytree(FIXTURE / "tokenizer", tmp_path / "tokenizer")
    later = {f"_orig_mod.{k}": v for k, v in state.items()}  # torch.compile's prefix is fine ...
    later["_orig_mod.resid_lambdas"] = np.ones(2, np.float32)  # ... weights we lack are not
    later["_orig_mod.value_embeds.1.weight"] = np.ones((4096, 128), np.float32)
    write_pt(ckpt / "model_000150.pt", later)
    with pytest.raises(nanochat.IncompatibleCheckpoint, match=r"\['resid_lambdas', 'value_embeds.1.weight'\]"):
        nanochat.import_checkpoint(tmp_path, "base")
    write_pt(ckpt / "model_000150.pt", {f"_orig_mod.{k}": v for k, v in state.items()})
    meta = json.loads((ckpt / "meta_000150.json").read_text())
    meta["model_config"]["window_pattern"] = "SSSL"  # sliding windows change the math, not the keys
    (ckpt / "meta_000150.json").write_text(json.dumps(meta))
    with pytest.raises(nanochat.IncompatibleCheckpoint, match="window_pattern"):
        nanochat.import_checkpoint(tmp_path, "base")
    assert not checkpoint_dir("base", "d2").exists()
    del meta["model_config"]["window_pattern"]
    (ckpt / "meta_000150.json").write_text(json.dumps(meta))
    assert nanochat.import_checkpoint(tmp_path, "base")["step"] == 150


# ---- tiktoken tokenizer ---------------------------------------------------------------------------

def test_tiktoken_tokenizer_keeps_the_sentencepiece_interface(tmp_path, fixture_tokenizer):
    tok = fixture_tokenizer
    state = pickle.loads((FIXTURE / "tokenizer" / "tokenizer.pkl").read_bytes())  # trusted here: the reference
    assert isinstance(state, tiktoken.Encoding)
    for text in SAMPLE_TEXTS:
        assert tok.encode(text) == state.encode_ordinary(text) and tok.decode(tok.encode(text)) == text
    assert [tok.encode_special(name) for name in SPECIAL_TOKENS] == list(range(4087, 4096))
    assert tok.bos_id == 4087 and tok.vocab_size == 4096 and tok.is_special(4091) and not tok.is_special(262)
    typed = tok.encode("<|assistant_end|>")  # nanochat's rule: special names in text are plain text
    assert 4091 not in typed and tok.decode(typed) == "<|assistant_end|>"
    assert tok.encode(SAMPLE_TEXTS, prepend="<|bos|>", append=4091) == [
        [4087, *state.encode_ordinary(t), 4091] for t in SAMPLE_TEXTS]
    # raw byte counts; nanochat's token_bytes.pt differs only where a token alone is not valid UTF-8
    theirs, ours = read_pt(FIXTURE / "tokenizer" / "token_bytes.pt"), tok.token_bytes()
    for i in np.flatnonzero(theirs != ours):
        with pytest.raises(UnicodeDecodeError):
            state.decode_single_token_bytes(int(i)).decode("utf-8")
    assert ours[4087:].sum() == 0 and ours[262] == len(b" the")
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert isinstance(again, TiktokenTokenizer) and again.encode(SAMPLE_TEXTS) == tok.encode(SAMPLE_TEXTS)
    ids, mask = render_conversation(tok, {"messages": [{"role": "user", "content": "hi"},
                                                       {"role": "assistant", "content": "yo"}]})
    hi, yo = state.encode_ordinary("hi"), state.encode_ordinary("yo")
    assert ids == [4087, 4088, *hi, 4089, 4090, *yo, 4091]
    assert mask == [0] * (len(ids) - 1 - len(yo)) + [1] * (len(yo) + 1)


# ---- a model trained here, exported and read back -------------------------------------------------

@pytest.fixture(scope="module")
def sentencepiece_tokenizer():
    docs = iter_documents(sorted(DEMO_DIR.glob("*.parquet"))[:1], doc_cap=20000)
    return train_tokenizer((piece for doc in docs for piece in split_for_training(doc)), 512)


def save_random_model(tokenizer, tag="here", stage="base"):
    """A tiny GQA model of ours with every weight random (no zero-init rows), saved with its tokenizer."""
    cfg = load_config("tiny")
    cfg.name, cfg.model.depth, cfg.model.n_kv_head = tag, 2, 1  # width 128: 2 query heads share 1 KV head
    cfg.model.vocab_size = tokenizer.vocab_size
    model_cfg = model_lib.GPTConfig.from_config(cfg.model)
    _, shapes, _ = model_lib.abstract_model(model_cfg)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0, 0.3 if s.shape[0] == cfg.model.dim else 1.0, s.shape)
                          .astype(np.float32), shapes)
    directory = checkpoint_dir(stage, tag)
    with Checkpointer(directory, keep=None, every=None) as checkpointer:
        checkpointer.save(5, params, None, {}, cfg, {}, force=True)
        checkpointer.wait()
    tokenizer.save(directory / "tokenizer")
    return load_model(stage, tag=tag)


def test_nanochat_export_round_trip_gives_the_same_logits(tmp_path, base_dir, fixture_tokenizer, capsys):
    ours = save_random_model(fixture_tokenizer)
    export_launcher.main(["-i", "base", "-g", "here", "--format=nanochat", f"--out={tmp_path / 'nc'}"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 5
    assert (tmp_path / "nc" / "base_checkpoints" / "d2" / "meta_000005.json").exists()
    nanochat.import_checkpoint(tmp_path / "nc", "base", tag="back")
    back = load_model("base", tag="back")
    ids = fixture_tokenizer.encode("It was the best of times", prepend="<|bos|>")
    np.testing.assert_array_equal(logits_of(back, ids)[0], logits_of(ours, ids)[0])
    assert (back.model_cfg.n_head, back.model_cfg.n_kv_head) == (2, 1)
    assert back.tokenizer.encode(SAMPLE_TEXTS) == fixture_tokenizer.encode(SAMPLE_TEXTS)


def test_exports_refuse_what_the_target_cannot_compute(tmp_path, base_dir, fixture_tokenizer):
    loaded = save_random_model(fixture_tokenizer)
    extra = dict(loaded.params, smear_gate={"kernel": np.zeros((2, 2), np.float32)})
    with pytest.raises(nanochat.IncompatibleCheckpoint, match="smear_gate"):
        hf.check_exportable(loaded.model_cfg, extra)

    @dataclasses.dataclass(frozen=True)
    class Later(model_lib.GPTConfig):
        window_pattern: str = "SSSL"

    with pytest.raises(nanochat.IncompatibleCheckpoint, match="window_pattern"):
        hf.check_exportable(Later(**dataclasses.asdict(loaded.model_cfg)), loaded.params)
    with pytest.raises(nanochat.IncompatibleCheckpoint, match="rope_base"):
        nanochat.check_exportable(dataclasses.replace(loaded.model_cfg, rope_base=100000.0))
    with pytest.raises(nanochat.IncompatibleCheckpoint, match="SentencePiece"):
        nanochat.export_checkpoint(dataclasses.replace(loaded, tokenizer=object()), tmp_path)


@pytest.mark.parametrize("kind", ["tiktoken", "sentencepiece"])
def test_hf_export_loads_in_transformers_with_the_same_logits_and_tokens(tmp_path, base_dir, kind, request):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tok = request.getfixturevalue(f"{kind}_tokenizer" if kind == "sentencepiece" else "fixture_tokenizer")
    ours = save_random_model(tok)
    export_launcher.main(["-i", "base", "--format=hf", f"--out={tmp_path / 'hf'}"])
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(model).__name__ == "NanoChatForCausalLM"
    ids = tok.encode("Once upon a time there was a", prepend="<|bos|>")
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(theirs, logits_of(ours, ids)[0], atol=1e-4, rtol=0)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    texts = SAMPLE_TEXTS + list(iter_documents(sorted(DEMO_DIR.glob("*.parquet"))[1:2], doc_cap=2000))[:100]
    for text in texts:
        assert hf_tok(text)["input_ids"] == tok.encode(text, prepend="<|bos|>")
        assert hf_tok.decode(tok.encode(text)) == text
    conversation = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                                 {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"},
                                 {"role": "assistant", "content": "6"}]}
    rendered = hf_tok.apply_chat_template(conversation["messages"][:-1], add_generation_prompt=True, tokenize=True)
    assert list(rendered["input_ids"]) == render_for_completion(tok, conversation)


def test_imported_model_is_scored_by_base_loss_with_its_own_tokenizer(base_dir, capsys, tmp_path):
    """base_loss --source/--tag takes the checkpoint's model (a d2 at context 2,048 under
    --config=tiny) and its tiktoken tokenizer, through the pretraining pipeline; a stage trained
    from it carries that tokenizer beside its own checkpoints."""
    from launch import base_loss
    from nanochat_jax.config import load_config
    from nanochat_jax.loading import open_source
    nanochat.import_checkpoint(FIXTURE, "base")
    result = base_loss.main(["--config=tiny", "--tag=d2", "--config.train.device_batch_size=1",
                             "--config.train.eval_tokens=1"])
    assert result["step"] == 150 and 0 < result["val_bpb"] < 8 and 0 < result["train_bpb"] < 8
    assert "loaded step 150" in capsys.readouterr().out
    source = open_source(load_config("tiny"), "base", tag="d2")
    assert source.config.model.sequence_len == 2048 and source.config.model.depth == 2
    source.carry_tokenizer(tmp_path / "run")
    carried = load_tokenizer(tmp_path / "run" / "tokenizer")
    assert isinstance(carried, TiktokenTokenizer) and carried.encode("Hello world") == source.tokenizer.encode("Hello world")
