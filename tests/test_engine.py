"""The KV-cached engine against the no-cache greedy reference, and its sampling and tool-use rules.

Random-weight models use a stub tokenizer whose special ids lie outside the vocabulary, so they
never stop early or open a python block. Tool use and stopping use a *bigram* model: with every
c_proj left at init_params' zeros, a token's logits depend on that token alone, and lm_head is
solved so that each scripted token's successors get the top logit.
"""
import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from launch import bench_infer
from nanochat_jax import engine as engine_lib
from nanochat_jax import hardware
from nanochat_jax import model as model_lib
from nanochat_jax import sharding
from nanochat_jax.engine import Engine
from nanochat_jax.sampling import greedy_generate
from nanochat_jax.tokenizer import SPECIAL_TOKENS, train_tokenizer

CFG = model_lib.GPTConfig(vocab_size=64, n_layer=2, dim=32, n_head=4, n_kv_head=2, sequence_len=64)
BUCKETS = (8, 16, 32)
PROMPTS = [[7], [3, 9, 27, 1, 40], list(range(2, 15)), [(5 * i) % 64 for i in range(20)]]


class StubTokenizer:
    """Special tokens outside a random model's vocabulary: it never samples one."""
    bos_id = 1000

    def encode_special(self, name):
        return 1000 + SPECIAL_TOKENS.index(name)


def random_params(cfg, seed=0):
    """Every weight random (init_params zeroes lm_head and c_proj, which would hide the network)."""
    leaves, treedef = jax.tree.flatten(model_lib.init_params(cfg, jax.random.key(seed)))
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


@pytest.fixture(scope="module")
def model():
    graphdef, _, _ = model_lib.abstract_model(CFG)
    params = random_params(CFG)
    return graphdef, params, Engine(graphdef, params, CFG, StubTokenizer(), buckets=BUCKETS)


def new_tokens(engine, prompt, **kwargs):
    results, _ = engine.generate_batch(prompt, **kwargs)
    return [row[len(prompt):] for row in results]


@pytest.mark.parametrize("n_kv_head", [2, 4])
def test_greedy_equals_the_no_cache_reference(n_kv_head):
    cfg = dataclasses.replace(CFG, n_kv_head=n_kv_head)
    graphdef, _, _ = model_lib.abstract_model(cfg)
    params = random_params(cfg)
    engine = Engine(graphdef, params, cfg, StubTokenizer(), buckets=BUCKETS)
    expected = greedy_generate(graphdef, params, PROMPTS, max_new_tokens=12)
    for prompt, reference in zip(PROMPTS, expected):
        assert new_tokens(engine, prompt, num_samples=2, max_tokens=12, temperature=0.0) == [reference] * 2


def test_pallas_decode_kernel_gives_the_reference_tokens():
    """attention=pallas: prefill and decode steps run kernels/decode_attention.py on the
    engine's bucketed caches (interpreted here), and give the greedy reference's tokens."""
    cfg = dataclasses.replace(CFG, attention="pallas")
    graphdef, _, _ = model_lib.abstract_model(cfg)
    params = random_params(cfg)
    engine = Engine(graphdef, params, cfg, StubTokenizer(), buckets=BUCKETS)
    reference_graphdef, _, _ = model_lib.abstract_model(CFG)
    for prompt in PROMPTS[1:3]:
        expected = greedy_generate(reference_graphdef, params, [prompt], max_new_tokens=6)[0]
        assert new_tokens(engine, prompt, num_samples=2, max_tokens=6, temperature=0.0) == [expected] * 2


def test_chunked_prefill_equals_one_shot(model):
    graphdef, params, one_shot = model
    chunked = Engine(graphdef, params, CFG, StubTokenizer(), buckets=BUCKETS, prefill_chunk=4)
    for prompt in PROMPTS:
        n = len(prompt)
        (logits_a, cache_a), (logits_b, cache_b) = one_shot.prefill_prompt(prompt), chunked.prefill_prompt(prompt)
        np.testing.assert_allclose(np.asarray(logits_a), np.asarray(logits_b), atol=1e-5)
        for name in ("k", "v"):  # slots past the prompt hold padding, which differs and is never read
            np.testing.assert_allclose(np.asarray(cache_a[name][:, :, :n]), np.asarray(cache_b[name][:, :, :n]),
                                       atol=1e-5)
        assert (new_tokens(chunked, prompt, max_tokens=10, temperature=0.0)
                == new_tokens(one_shot, prompt, max_tokens=10, temperature=0.0))
    with pytest.raises(ValueError, match="must divide"):
        Engine(graphdef, params, CFG, StubTokenizer(), buckets=BUCKETS, prefill_chunk=6)


def test_sampling_is_seeded_and_every_row_draws_its_own_first_token(model):
    *_, engine = model
    prompt = PROMPTS[1]
    rows = new_tokens(engine, prompt, num_samples=8, max_tokens=6, temperature=1.0, seed=3)
    assert rows == new_tokens(engine, prompt, num_samples=8, max_tokens=6, temperature=1.0, seed=3)
    assert rows != new_tokens(engine, prompt, num_samples=8, max_tokens=6, temperature=1.0, seed=4)
    assert len({tuple(r) for r in rows}) > 1
    for seed in range(5):  # nanochat broadcast one first token to all rows
        first, _ = next(engine.generate(prompt, num_samples=8, max_tokens=1, temperature=1.0, seed=seed))
        assert len(set(first)) > 1, (seed, first)


def test_top_k_1_is_greedy(model):
    *_, engine = model
    for prompt in PROMPTS[:2]:
        greedy = new_tokens(engine, prompt, max_tokens=8, temperature=0.0)[0]
        assert new_tokens(engine, prompt, num_samples=4, max_tokens=8, temperature=1.0, top_k=1) == [greedy] * 4
    with pytest.raises(ValueError, match="top_k"):
        engine.generate(PROMPTS[0], max_tokens=1, top_k=0)


def test_context_overflow_is_a_clear_error(model):
    *_, engine = model
    with pytest.raises(ValueError, match="prompt of 60 tokens \\+ max_tokens 10 exceeds the model's context of 64"):
        engine.generate([1] * 60, max_tokens=10)
    with pytest.raises(ValueError, match="prompt of 70 tokens"):
        engine.generate_batch([1] * 70, max_tokens=1)
    assert len(list(engine.generate([1] * 60, max_tokens=None, temperature=0.0))) == 4  # None: fill the context


def test_prompts_in_one_bucket_share_a_compiled_prefill():
    graphdef, _, _ = model_lib.abstract_model(CFG)
    engine = Engine(graphdef, random_params(CFG), CFG, StubTokenizer(), buckets=BUCKETS)
    assert engine.buckets == (8, 16, 32, 64)
    for length in (3, 5, 8):
        engine.generate_batch(list(range(1, length + 1)), max_tokens=2, temperature=0.0)
    assert engine.prefill._cache_size() == 1
    engine.generate_batch(list(range(1, 10)), max_tokens=2, temperature=0.0)
    assert engine.prefill._cache_size() == 2
    assert engine_lib.bucket_sizes(2048) == (64, 128, 256, 512, 1024, 2048)


def test_fsdp_sharded_params_give_the_same_output(model):
    graphdef, params, single = model
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    rules = sharding.parse_rules({"embed": "fsdp", "vocab": "", "heads": "", "mlp": ""})
    _, shapes, logical = model_lib.abstract_model(CFG)
    sharded = jax.device_put(params, sharding.named_shardings(logical, shapes, mesh, rules))
    assert len(sharded["blocks"][0]["mlp"]["c_fc"]["kernel"].sharding.device_set) == 8
    engine = Engine(graphdef, sharded, CFG, StubTokenizer(), buckets=BUCKETS)
    for kwargs in (dict(temperature=0.0), dict(temperature=1.0, num_samples=4, seed=5)):
        assert new_tokens(engine, PROMPTS[2], max_tokens=8, **kwargs) == new_tokens(single, PROMPTS[2], max_tokens=8,
                                                                                     **kwargs)


# ---- stopping and tool use, with a scripted bigram model and a real tokenizer -------------------

@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["what is 1+3? it is 4.", "the quick brown fox jumps", "a b c d e f g"] * 20, 300)


def bigram_engine(tokenizer, script: dict[int, list[int]]):
    """An engine whose model follows `script`: token -> equally likely successors (+14.5 after the
    softcap, -14.5 for every other token). Tokens not in the script have arbitrary successors."""
    cfg = model_lib.GPTConfig(vocab_size=tokenizer.vocab_size, n_layer=2, dim=32, n_head=4, n_kv_head=2,
                              sequence_len=32)
    graphdef, _, _ = model_lib.abstract_model(cfg)
    params = model_lib.init_params(cfg, jax.random.key(0))
    sources = list(script)
    hidden = np.asarray(model_lib.rms_norm(params["wte"][jnp.array(sources)]), np.float64)
    targets = np.full((len(sources), cfg.vocab_size), -30.0)
    for row, source in enumerate(sources):
        targets[row, script[source]] = 30.0
    params["lm_head"]["kernel"] = jnp.asarray(np.linalg.pinv(hidden) @ targets, jnp.float32)
    return Engine(graphdef, params, cfg, tokenizer, buckets=(8, 16))


def test_rows_stop_on_assistant_end_or_bos_each_on_their_own(tokenizer):
    special = tokenizer.encode_special
    start, end, bos = special("<|assistant_start|>"), special("<|assistant_end|>"), tokenizer.bos_id
    a, b, c = tokenizer.encode("abc")
    engine = bigram_engine(tokenizer, {start: [a, b], a: [end], b: [c], c: [bos]})
    prompt = [bos, *tokenizer.encode("the fox"), start]
    columns = list(engine.generate(prompt, num_samples=8, max_tokens=20, temperature=1.0, seed=0))
    assert len(columns) == 3  # every row is done after [a, end] or [b, c, bos]
    results, masks = engine.generate_batch(prompt, num_samples=8, max_tokens=20, temperature=1.0, seed=0)
    generated = [row[len(prompt):] for row in results]
    assert {tuple(g) for g in generated} == {(a,), (b, c)}
    assert masks == [[0] * len(prompt) + [1] * len(g) for g in generated]


def test_calculator_output_is_forced_with_mask_0(tokenizer):
    special = tokenizer.encode_special
    start, end = special("<|assistant_start|>"), special("<|assistant_end|>")
    py_start, py_end = special("<|python_start|>"), special("<|python_end|>")
    out_start, out_end = special("<|output_start|>"), special("<|output_end|>")
    one, plus, three = tokenizer.encode("1+3")
    script = {start: [py_start], py_start: [one], one: [plus], plus: [three], three: [py_end], out_end: [end]}
    engine = bigram_engine(tokenizer, script)
    prompt = [tokenizer.bos_id, *tokenizer.encode("what is 1+3?"), start]
    results, masks = engine.generate_batch(prompt, num_samples=2, max_tokens=20, temperature=0.0)
    four = tokenizer.encode("4")
    expected = prompt + [py_start, one, plus, three, py_end, out_start, *four, out_end]
    assert results == [expected] * 2
    assert masks == [[0] * len(prompt) + [1] * 5 + [0] * (len(four) + 2)] * 2
    assert tokenizer.decode(results[0][len(prompt):]) == "<|python_start|>1+3<|python_end|><|output_start|>4<|output_end|>"


# ---- the benchmark -------------------------------------------------------------------------------

def test_bench_infer_reports_throughput_and_bytes(capsys):
    result = bench_infer.main(["--config=tiny", "--config.model.depth=1", "--prompt_len=8", "--steps=2",
                               "--prefill_reps=1", "--warmup=0"])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("{")
    for batch in (1, 16):
        assert result[f"decode_tokens_per_s_b{batch}"] == batch / result[f"decode_step_s_b{batch}"]
        assert result[f"decode_floor_s_b{batch}"] is None  # no bandwidth for CPUs
    assert result["prefill_tokens_per_s"] > 0 and result["cache_len"] == 64
    cfg = model_lib.GPTConfig(vocab_size=4096, n_layer=1, dim=64, n_head=1, n_kv_head=1, sequence_len=256)
    cache_row = 2 * cfg.n_layer * 64 * cfg.n_kv_head * cfg.head_dim * 4
    assert result["cache_bytes_b16"] == 16 * cache_row
    assert result["decode_bytes_b1"] == result["param_bytes"] - 4096 * 64 * 4 + 64 * 4 + cache_row
    gpu = lambda kind: types.SimpleNamespace(platform="gpu", device_kind=kind)
    assert hardware.memory_bandwidth(gpu("NVIDIA H100 80GB HBM3")) == 3.35e12
    assert hardware.memory_bandwidth(gpu("NVIDIA H100 PCIe")) == 2.0e12
    assert hardware.memory_bandwidth(gpu("NVIDIA H200")) == 4.8e12
    assert hardware.memory_bandwidth(gpu("NVIDIA A100-SXM4-40GB")) == 1.55e12
    assert hardware.memory_bandwidth(gpu("NVIDIA A100-SXM4-80GB")) == 2.0e12
