"""The chat CLI as a new user meets it: with only a base checkpoint, the bare command finds it,
a one-shot prompt gets as many new tokens as fit the context, and a conversation that outgrows
the context drops its oldest turns or starts over instead of crashing."""
import builtins
import itertools

import jax
import numpy as np
import pytest

from launch import chat_cli
from nanochat_jax import model as model_lib
from nanochat_jax.checkpoint import Checkpointer, checkpoint_dir
from nanochat_jax.config import load_config
from nanochat_jax.data.shards import DEMO_DIR, iter_documents
from nanochat_jax.sampling import greedy_generate
from nanochat_jax.tokenizer import SPECIAL_IDS, split_for_training, train_tokenizer

CONTEXT = 64


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A base directory with a 512-token tokenizer and one base checkpoint of a random model that
    never emits a special token (so replies always run to their token budget)."""
    root = tmp_path_factory.mktemp("base")
    docs = list(iter_documents([DEMO_DIR / "shard_00000.parquet"]))[:300]
    tok = train_tokenizer((p for d in docs for p in split_for_training(d)), 512)
    tok.save(root / "tokenizer")
    cfg = load_config("tiny")
    cfg.model.update(vocab_size=512, depth=1, sequence_len=CONTEXT)
    model_cfg = model_lib.GPTConfig.from_config(cfg.model)
    leaves, treedef = jax.tree.flatten(model_lib.init_params(model_cfg, jax.random.key(0)))
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    head = np.asarray(params["lm_head"]["kernel"]) * 3.0
    head[:, :max(SPECIAL_IDS.values()) + 1] = 0.0
    params["lm_head"]["kernel"] = jax.numpy.asarray(head)
    mp = pytest.MonkeyPatch()
    mp.setenv("NANOCHAT_BASE_DIR", str(root))
    with Checkpointer(checkpoint_dir("base", "tiny")) as checkpointer:
        checkpointer.save(1, params, {"count": np.zeros((), np.int32)}, {}, cfg.to_dict(), {}, force=True)
        checkpointer.wait()
    mp.undo()
    graphdef, _, _ = model_lib.abstract_model(model_cfg)
    return root, tok, graphdef, params


def test_bare_one_shot_finds_the_base_model_and_fills_the_context(base_dir, monkeypatch, capsys):
    root, tok, graphdef, params = base_dir
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(root))
    assert chat_cli.main(["-p", "The capital of France is", "-t", "0"]) == 0  # default -m 256 > the context
    out = capsys.readouterr()
    special = tok.encode_special
    prompt = [tok.bos_id, special("<|user_start|>"), *tok.encode("The capital of France is"),
              special("<|user_end|>"), special("<|assistant_start|>")]
    expected = tok.decode(greedy_generate(graphdef, params, [prompt], CONTEXT - len(prompt))[0])
    assert out.out == "\nAssistant: " + expected + "\n"
    assert "base model" in out.err


def test_a_conversation_that_outgrows_the_context_drops_turns_or_starts_over(base_dir, monkeypatch, capsys):
    root, *_ = base_dir
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(root))
    message, users, asked, choices = "Tell me more about the whale and the sea", [], [], itertools.cycle("ds")

    def fake_input(prompt=""):
        if prompt.startswith("(the conversation"):
            asked.append(prompt)
            return next(choices)
        users.append(prompt)
        return message if len(users) <= 8 else "quit"
    monkeypatch.setattr(builtins, "input", fake_input)
    assert chat_cli.main(["-m", "8", "-t", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("Assistant: ") == 8 and len(asked) >= 2
    assert "(dropped the " in out and "(conversation cleared)" in out


def test_a_message_too_long_for_the_context_is_refused(base_dir, monkeypatch, capsys):
    root, *_ = base_dir
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(root))
    assert chat_cli.main(["-p", "word " * 80]) == 1
    assert "does not fit the model's 64-token context" in capsys.readouterr().out
