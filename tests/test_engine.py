"""The KV-cached engine against the no-cache greedy reference, and its sampling and tool-use rules.

Random-weight models use a stub tokenizer whose special ids lie outside the vocabulary, so they
never stop early or open a python block. Tool use and stopping use a *bigram* model: with every
c_proj left at init_params' zeros, a token's logits depend on that token alone, and lm_head is
solved so that each scripted token's successors get the top logit.
"""
import dataclasses
import functools
import itertools
import json
import math
import re
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
BUCKETS = (16,)  # with the context: 16 and 64, two shapes per step, and prompts and decodes that cross 16
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


@functools.cache
def random_engine(n_kv_head: int = CFG.n_kv_head) -> Engine:
    """The random model's engine, one per KV head count for every test that uses it: each engine
    compiles its own steps, so sharing them is what keeps this file fast."""
    cfg = dataclasses.replace(CFG, n_kv_head=n_kv_head)
    return Engine(model_lib.abstract_model(cfg)[0], random_params(cfg), cfg, StubTokenizer(), buckets=BUCKETS)


@pytest.fixture(scope="module")
def model():
    engine = random_engine()
    return model_lib.abstract_model(CFG)[0], random_params(CFG), engine


def new_tokens(engine, prompt, **kwargs):
    results, _ = engine.generate_batch(prompt, **kwargs)
    return [row[len(prompt):] for row in results]


@pytest.mark.parametrize("n_kv_head", [2, 4])
def test_greedy_equals_the_no_cache_reference(n_kv_head):
    cfg = dataclasses.replace(CFG, n_kv_head=n_kv_head)
    engine = random_engine(n_kv_head)
    expected = greedy_generate(model_lib.abstract_model(cfg)[0], random_params(cfg), PROMPTS, max_new_tokens=12)
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
        for a, b in zip(jax.tree.leaves(cache_a), jax.tree.leaves(cache_b), strict=True):
            # slots past the prompt hold padding, which differs and is never read
            np.testing.assert_allclose(np.asarray(a[:, :n]), np.asarray(b[:, :n]), atol=1e-5)
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


def test_prompts_in_one_bucket_share_a_compiled_prefill(model):
    graphdef, params, _ = model
    engine = Engine(graphdef, params, CFG, StubTokenizer(), buckets=(8, 16, 32))  # its own prefill cache
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


def copied_elements(compiled) -> list[int]:
    """Element counts of the arrays a compiled program copies (XLA `copy` ops)."""
    lines = [line.split(" copy")[0] for line in compiled.as_text().splitlines() if re.search(r" copy(-start)?\(", line)]
    return [max(math.prod(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\w+\[([\d,]*)\]", line))
            for line in lines]


def test_decode_step_and_admission_write_the_cache_in_place(model):
    """No compiled step copies a cache-sized buffer: the decode step (sampling or not) writes each
    new key/value into the donated cache, and so does generate_many's admission of a prompt."""
    *_, engine = model
    rows, capacity = 4, 256
    cache = engine.empty_cache(rows, capacity)
    layer_elements = rows * capacity * CFG.n_kv_head * CFG.head_dim
    tokens, positions = np.zeros((rows, 1), np.int32), np.full(rows, 5, np.int32)
    ids = np.zeros(rows, np.int32)
    steps = {
        "decode": engine.decode_step.lower(engine.params, tokens, cache, positions, kv_len=8),
        "sample": engine._sample_step.lower(engine.params, tokens, cache, positions, ids.astype(np.uint32), ids, ids,
                                            1.0, top_k=5, kv_len=8),
        "admit": engine.insert_rows.lower(cache, engine.prefill_prompt(PROMPTS[1])[1], np.array([1, 3], np.int32)),
    }
    for name, lowered in steps.items():
        copied = copied_elements(lowered.compile())
        assert all(n < layer_elements // 8 for n in copied), (name, copied)


@pytest.mark.parametrize("n_kv_head", [2, 4])
def test_generate_many_rows_equal_generate_batch_per_prompt(model, n_kv_head):
    """Prompts of different lengths decoding together, at most 4 rows (2 prompts) at once, give
    each prompt's generate_batch rows: greedily, and (with GQA) sampled with seed + prompt index.
    A prompt near the context stops there (generate_batch is asked for exactly what fits)."""
    engine = random_engine(n_kv_head)
    prompts = PROMPTS + [list(range(1, 60))]
    cases = [dict(temperature=0.0)] + ([dict(temperature=1.0, top_k=8, seed=11)] if n_kv_head == 2 else [])
    for kwargs in cases:
        many = engine.generate_many(prompts, num_samples=2, max_tokens=9, max_rows=5, **kwargs)
        seed = kwargs.pop("seed", 0)
        for i, prompt in enumerate(prompts):
            alone = engine.generate_batch(prompt, 2, max_tokens=min(9, CFG.sequence_len - len(prompt)),
                                          seed=seed + i, **kwargs)
            assert many[i] == alone, (kwargs, i)
    assert [len(row) for row in many[-1][0]] == [CFG.sequence_len] * 2


def test_generate_many_checks_its_arguments(model):
    *_, engine = model
    assert engine.generate_many([]) == []
    for prompts, kwargs, message in (([[]], {}, "1 to 63 tokens"), ([[1] * 64], {}, "1 to 63 tokens"),
                                     ([[1]], dict(num_samples=4, max_rows=3), "max_rows 3 is fewer"),
                                     ([[1]], dict(top_k=0), "top_k"), ([[1]], dict(max_tokens=0), "at least 1")):
        with pytest.raises(ValueError, match=message):
            engine.generate_many(prompts, **kwargs)


# ---- stopping and tool use, with a scripted bigram model and a real tokenizer -------------------

@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["what is 1+3? it is 4.", "the quick brown fox jumps", "a b c d e f g"] * 20, 300)


def bigram_engine(tokenizer, script: dict[int, list[int]], n_layer: int = 2, buckets=(16,)):
    """An engine whose model follows `script`: token -> equally likely successors (+14.5 after the
    softcap, -14.5 for every other token). Tokens not in the script have arbitrary successors."""
    cfg = model_lib.GPTConfig(vocab_size=tokenizer.vocab_size, n_layer=n_layer, dim=32, n_head=4, n_kv_head=2,
                              sequence_len=32)
    graphdef, _, _ = model_lib.abstract_model(cfg)
    params = model_lib.init_params(cfg, jax.random.key(0))
    sources = list(script)
    hidden = np.asarray(model_lib.rms_norm(params["wte"][jnp.array(sources)]), np.float64)
    targets = np.full((len(sources), cfg.vocab_size), -30.0)
    for row, source in enumerate(sources):
        targets[row, script[source]] = 30.0
    params["lm_head"]["kernel"] = jnp.asarray(np.linalg.pinv(hidden) @ targets, jnp.float32)
    return Engine(graphdef, params, cfg, tokenizer, buckets=buckets)


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


def test_generate_many_runs_the_tool_and_stops_each_row_on_its_own(tokenizer):
    """Rows that stop, call the calculator or run to the context end, one prompt's rows entering
    as another's finish (max_rows 2): each prompt's rows and masks are generate_batch's."""
    special = tokenizer.encode_special
    start, end, bos = special("<|assistant_start|>"), special("<|assistant_end|>"), tokenizer.bos_id
    py_start, py_end, out_end = special("<|python_start|>"), special("<|python_end|>"), special("<|output_end|>")
    one, plus, three = tokenizer.encode("1+3")
    a, b, c = tokenizer.encode("abc")
    script = {start: [py_start], py_start: [one], one: [plus], plus: [three], three: [py_end], out_end: [end],
              a: [end], b: [c], c: [b]}
    engine = bigram_engine(tokenizer, script)
    head = [bos, *tokenizer.encode("what is 1+3?")]
    prompts = [head + [start], head + [a], [bos, b], head[:3] + [start], [bos] * 20 + [b]]
    many = engine.generate_many(prompts, num_samples=2, max_tokens=16, temperature=0.0, max_rows=2)
    for prompt, (rows, masks) in zip(prompts, many):
        assert (rows, masks) == engine.generate_batch(prompt, 2, max_tokens=min(16, 32 - len(prompt)), temperature=0.0)
    assert many[0][0][0][-1] == out_end and many[1][0][0] == prompts[1]  # the tool ran; a stopped at once
    assert len(many[2][0][0]) == 2 + 16 and len(many[4][0][0]) == 32  # b c b c ... to max_tokens, to the context


# ---- the benchmark -------------------------------------------------------------------------------

def test_bench_infer_reports_throughput_and_bytes(capsys, monkeypatch):
    """Decode at each capacity (256, 512) for 1 and 16 rows reads what the valid length needs,
    the same at both capacities: every weight (of the embedding, one row per token) plus the 64
    slots of the bucket holding positions 8..9, for each row. Throughputs are read against a
    clock that advances a quarter second per reading, so every timed call lasts 0.25 s."""
    quarters = itertools.count()
    monkeypatch.setattr(bench_infer, "time", types.SimpleNamespace(perf_counter=lambda: 0.25 * next(quarters)))
    result = bench_infer.main(["--config=tiny", "--config.model.depth=1", "--config.model.sequence_len=512",
                               "--prompt_len=8", "--steps=2", "--prefill_reps=1", "--warmup=0", "--samples=2",
                               "--new_tokens=3"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(result))
    dim, vocab = 64, 4096  # depth 1: one layer of width 64, one head
    assert result["param_bytes"] == 4 * model_lib.num_params(model_lib.GPTConfig(
        vocab_size=vocab, n_layer=1, dim=dim, n_head=1, n_kv_head=1, sequence_len=512))
    slot_bytes = 2 * 1 * 1 * 64 * 4  # k and v, one layer, one KV head of 64, fp32
    assert [(d["rows"], d["capacity"]) for d in result["decode"]] == [(1, 256), (1, 512), (16, 256), (16, 512)]
    for d in result["decode"]:  # a step of 1 or 16 rows in 0.25 s: 4 or 64 tokens/s
        assert (d["step_s"], d["tokens_per_s"]) == (0.25, {1: 4.0, 16: 64.0}[d["rows"]])
        assert d["floor_s"] is None and d["kv_len"] == 64  # no bandwidth for CPUs
        assert d["bytes"] == result["param_bytes"] - vocab * dim * 4 + d["rows"] * (dim * 4 + 64 * slot_bytes)
    assert result["prefill_tokens_per_s"] == 32.0  # the 8-token prompt in 0.25 s
    assert (result["generate_s"], result["generate_tokens_per_s"]) == (0.25, 24.0)  # 2 rows x 3 tokens
    gpu = lambda kind: types.SimpleNamespace(platform="gpu", device_kind=kind)
    assert hardware.memory_bandwidth(gpu("NVIDIA H100 80GB HBM3")) == 3.35e12
    assert hardware.memory_bandwidth(gpu("NVIDIA H100 PCIe")) == 2.0e12
    assert hardware.memory_bandwidth(gpu("NVIDIA H200")) == 4.8e12
    assert hardware.memory_bandwidth(gpu("NVIDIA A100-SXM4-40GB")) == 1.55e12
    assert hardware.memory_bandwidth(gpu("NVIDIA A100-SXM4-80GB")) == 2.0e12
