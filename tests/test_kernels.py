"""The Pallas attention kernels (interpreted on CPU) against dense pure-JAX references.

Errors are relative, ||a - b|| / ||b||: within 1e-4 for fp32 and 1e-2 for bf16 (whose reference
is the fp32 result on the same bf16-rounded inputs). Small block sizes (16, 32) make a few dozen
positions cross several block edges, ragged tails and causal diagonals. Block sizes that are not
powers of two and share no factor (6 and 5; fine when interpreted, not on a GPU) put the causal
diagonal at every offset within a block, so that an off-by-one in any block range shows up.
"""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.decode_attention import decode_attention
from kernels.flash_attention import BlockSizes, flash_attention
from kernels.mgpu_ops import MgpuBlocks
from kernels.reference import attention_reference, decode_reference
from launch.bench_attention import train_variants
from nanochat_jax import attention as attn_lib
from nanochat_jax import sharding
from nanochat_jax.config import load_config
from nanochat_jax.model import GPTConfig, abstract_model, loss_fn

TOL = {jnp.float32: 1e-4, jnp.bfloat16: 1e-2}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def random_qkv(batch, q_len, kv_len, heads, kv_heads, head_dim, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, kv_len, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, kv_len, kv_heads, head_dim), dtype)
    return q, k, v, jax.random.normal(keys[3], q.shape, dtype)


def output_and_grads(fn, q, k, v, d_out):
    """fn(q, k, v) and the gradient of sum(fn * d_out) w.r.t. q, k, v, in one jitted call."""
    def run(q, k, v):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(d_out)
    return jax.jit(run)(q, k, v)


def assert_no_nan(*arrays):
    for x in jax.tree.leaves(arrays):
        assert not np.isnan(np.asarray(x, np.float32)).any()


# ---- flash attention: forward and backward ---------------------------------------------------

FLASH_CASES = {  # batch, T, S, H, Hkv, D, dtype, causal, blocks
    "gqa2-ragged-fp32": (2, 40, 40, 4, 2, 64, jnp.float32, True, BlockSizes(16, 32, 32, 16)),
    "mqa5-ragged-bf16": (1, 33, 33, 5, 1, 64, jnp.bfloat16, True, BlockSizes(16, 16, 16, 16)),
    "mha-T=block-d128": (1, 16, 16, 2, 2, 128, jnp.float32, True, BlockSizes(16, 16, 16, 16)),
    "mha-T=block+1": (1, 17, 17, 2, 2, 64, jnp.float32, True, BlockSizes(16, 16, 16, 16)),
    "gqa2-d128-bf16": (1, 50, 50, 4, 2, 128, jnp.bfloat16, True, BlockSizes(32, 16, 16, 32)),
    "odd-blocks": (1, 45, 45, 2, 2, 64, jnp.float32, True, BlockSizes(6, 5, 5, 6)),
    "odd-blocks-more-keys": (1, 30, 43, 2, 1, 64, jnp.float32, True, BlockSizes(6, 5, 5, 6)),
    "not-causal": (1, 20, 37, 4, 2, 64, jnp.float32, False, BlockSizes(16, 16, 16, 16)),
}
SLOW_FLASH = {"gqa2-d128-bf16"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_FLASH else c
                                  for c in FLASH_CASES])
def test_flash_matches_reference(case):
    """Output and dq, dk, dv agree with the dense reference; no NaN anywhere."""
    batch, q_len, kv_len, heads, kv_heads, head_dim, dtype, causal, blocks = FLASH_CASES[case]
    q, k, v, d_out = random_qkv(batch, q_len, kv_len, heads, kv_heads, head_dim, dtype)
    out, grads = output_and_grads(
        lambda q, k, v: flash_attention(q, k, v, causal=causal, block_sizes=blocks), q, k, v, d_out)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, d_out)]
    ref_out, ref_grads = output_and_grads(
        lambda q, k, v: attention_reference(q, k, v, causal=causal), *f32)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert_no_nan(out, grads)
    assert rel_err(out, ref_out) < TOL[dtype]
    for name, grad, ref in zip("qkv", grads, ref_grads):
        assert rel_err(grad, ref) < TOL[dtype], f"d{name}"


@pytest.mark.parametrize("cut", [16, 17], ids=["at-block-edge", "one-past"])
def test_causal_mask_is_exact_at_block_edges(cut):
    """Keys at positions >= cut change nothing for queries < cut, bit for bit, and get exactly
    zero gradient from them, with blocks (16 x 32 forward, 16 x 32 backward) whose edges
    straddle the cut, so that the mask, not the block skipping, has to do it."""
    blocks = BlockSizes(16, 32, 16, 32)
    q, k, v, d_out = random_qkv(1, 40, 40, 2, 1, 64, jnp.float32)
    d_out = d_out.at[:, cut:].set(0.0)
    _, k2, v2, _ = random_qkv(1, 40, 40, 2, 1, 64, jnp.float32, seed=1)
    k2 = k.at[:, cut:].set(100.0 * k2[:, cut:])
    v2 = v.at[:, cut:].set(100.0 * v2[:, cut:])
    fn = lambda q, k, v: flash_attention(q, k, v, block_sizes=blocks)
    out, (dq, dk, dv) = output_and_grads(fn, q, k, v, d_out)
    out2, _ = output_and_grads(fn, q, k2, v2, d_out)
    np.testing.assert_array_equal(out[:, :cut], out2[:, :cut])
    assert not np.any(dk[:, cut:]) and not np.any(dv[:, cut:]) and not np.any(dq[:, cut:])
    assert np.all(np.any(dk[:, :cut] != 0, axis=-1))


def test_backend_registry():
    """`pallas` and `mosaic` are selectable (mosaic only on a GPU); `auto` never picks them yet."""
    assert "pallas" in attn_lib.BACKENDS
    assert attn_lib.resolve_backend("pallas", jnp.float32) == "pallas"
    assert attn_lib.resolve_backend("auto", jnp.bfloat16) == ("cudnn" if jax.default_backend() == "gpu" else "xla")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="Hopper GPUs only"):
            attn_lib.resolve_backend("mosaic", jnp.bfloat16)


KERNEL_LOADING = """
import dataclasses, json, sys
import jax, numpy as np
from nanochat_jax import model as model_lib
loaded = lambda: sorted(m for m in sys.modules if m.split(".")[0] == "kernels" or m.startswith("jax.experimental.pallas"))
on_import = loaded()
cfg = model_lib.GPTConfig(vocab_size=32, n_layer=1, dim=32, n_head=2, n_kv_head=1, sequence_len=16, attention="xla")
params = model_lib.init_params(cfg, jax.random.key(0))
params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(1), p.shape), params)
idx = np.arange(12).reshape(1, 12) % 32
xla = model_lib.forward(model_lib.abstract_model(cfg)[0], params, idx)
after_xla = loaded()
graphdef = model_lib.abstract_model(dataclasses.replace(cfg, attention="pallas"))[0]
pallas = model_lib.forward(graphdef, params, idx)
print(json.dumps({"on_import": on_import, "after_xla": after_xla, "after_pallas": loaded(),
                  "max_diff": float(np.max(np.abs(np.asarray(pallas) - np.asarray(xla))))}))
"""


def test_kernels_load_only_when_a_kernel_backend_runs():
    """In a fresh interpreter, importing the model and running it on xla loads neither kernels/ nor
    Pallas' public API; a forward on pallas then loads the flash kernel and gives xla's logits."""
    proc = subprocess.run([sys.executable, "-c", KERNEL_LOADING], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["on_import"] == result["after_xla"] == []
    assert "kernels.flash_attention" in result["after_pallas"]
    assert result["max_diff"] < 1e-4
    # attention.py hard-codes the Mosaic GPU decode kernel's row limit so as not to import it
    from kernels.decode_attention_mgpu import ROWS
    assert attn_lib.DECODE_KERNEL_ROWS == ROWS


def test_model_with_pallas_matches_xla():
    """One fp32 GPT layer (GQA, T = 24 so the 32-block has a ragged tail): the same loss and
    parameter gradients with attention="pallas" as with "xla"."""
    cfg = GPTConfig(vocab_size=64, n_layer=1, dim=64, n_head=4, n_kv_head=2, sequence_len=24,
                    compute_dtype="float32", attention="xla")
    leaves, treedef = jax.tree.flatten(abstract_model(cfg)[1])
    rng = np.random.default_rng(0)  # random everywhere: init_params zeroes c_proj and lm_head
    params = jax.tree.unflatten(treedef, [jnp.asarray(rng.standard_normal(x.shape) / np.sqrt(x.shape[0]),
                                                      jnp.float32) for x in leaves])
    idx = rng.integers(0, cfg.vocab_size, (2, cfg.sequence_len))
    targets = rng.integers(0, cfg.vocab_size, (2, cfg.sequence_len))

    def loss_and_grads(backend):
        graphdef = abstract_model(dataclasses.replace(cfg, attention=backend))[0]
        return jax.jit(jax.value_and_grad(lambda p: loss_fn(graphdef, p, idx, targets)))(params)

    loss_x, grads_x = loss_and_grads("xla")
    loss_p, grads_p = loss_and_grads("pallas")
    np.testing.assert_allclose(float(loss_p), float(loss_x), rtol=1e-6)
    flat_x, flat_p = jax.tree.leaves(grads_x), jax.tree.leaves(grads_p)
    assert all(rel_err(p, x) < 1e-4 for p, x in zip(flat_p, flat_x, strict=True))
    assert np.all(np.abs(np.asarray(grads_p["blocks"][0]["attn"]["c_k"]["kernel"])) > 0)  # attention is exercised


@pytest.mark.parametrize("kv_heads, local_q_heads, local_kv_heads", [(2, 2, 1), (1, 4, 1)])
def test_pallas_runs_per_shard_under_a_mesh(monkeypatch, kv_heads, local_q_heads, local_kv_heads):
    """On 8 devices (data 2 x fsdp 2 x tensor 2) the kernel sees each device's shard (batch / 4,
    heads / 2) instead of gathered arrays, and output and gradients equal the unsharded kernel's.
    With one KV head (MQA, not divisible by tensor = 2) heads stay whole on every device."""
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = sharding.parse_rules(load_config("tiny").mesh.rules)
    q, k, v, d_out = random_qkv(8, 24, 24, 4, kv_heads, 64, jnp.float32)
    want = output_and_grads(lambda q, k, v: flash_attention(q, k, v), q, k, v, d_out)

    seen = []
    def spy(q, k, v, **kw):
        seen.append((q.shape, k.shape))
        return flash_attention(q, k, v, **kw)
    monkeypatch.setattr("kernels.flash_attention.flash_attention", spy)  # attention.py imports it when run
    with sharding.activation_rules(mesh, rules):
        got = output_and_grads(lambda q, k, v: attn_lib.attention(q, k, v, backend="pallas"), q, k, v, d_out)
    assert seen[0] == ((2, 24, local_q_heads, 64), (2, 24, local_kv_heads, 64))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert rel_err(g, w) < 1e-6


# ---- decode attention ------------------------------------------------------------------------

DECODE_CASES = {  # batch, Tq, S, H, Hkv, D, dtype, lengths, num_splits
    "gqa2-fp32": (4, 1, 64, 4, 2, 64, jnp.float32, [1, 15, 33, 64], 2),
    "mqa5-bf16-d128": (4, 3, 80, 5, 1, 128, jnp.bfloat16, [3, 17, 18, 80], None),
    "ragged-cache": (2, 2, 50, 2, 2, 64, jnp.float32, [2, 50], 4),
}


@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_decode_equals_attention_over_each_valid_prefix(case):
    """Row b's output equals xla_attention of its queries over cache[b, :lengths[b]] (the queries
    being the prefix's last Tq positions); stale cache entries past the length change nothing."""
    batch, q_len, cache_len, heads, kv_heads, head_dim, dtype, lengths, splits = DECODE_CASES[case]
    q, k_cache, v_cache, _ = random_qkv(batch, q_len, cache_len, heads, kv_heads, head_dim, dtype)
    lengths = jnp.asarray(lengths, jnp.int32)
    stale = jnp.arange(cache_len)[None, :, None, None] >= lengths[:, None, None, None]
    k_cache = jnp.where(stale, 1e4, k_cache).astype(dtype)
    v_cache = jnp.where(stale, -1e4, v_cache).astype(dtype)
    run = jax.jit(lambda q, k, v, n: decode_attention(q, k, v, n, block_k=16, num_splits=splits))
    out = run(q, k_cache, v_cache, lengths)
    assert out.shape == q.shape and out.dtype == dtype
    assert_no_nan(out)
    for b, n in enumerate(np.asarray(lengths)):
        rows = [x[b:b + 1].astype(jnp.float32) for x in (q, k_cache[:, :n], v_cache[:, :n])]
        assert rel_err(out[b:b + 1], attn_lib.xla_attention(*rows, causal=True)) < TOL[dtype], f"row {b}"
    assert rel_err(out, decode_reference(q, k_cache, v_cache, lengths)) < TOL[dtype]


def test_decode_split_count_and_short_rows():
    """Any split count gives the same result; a query that would sit before position 0 gives 0
    (row 0, length 1 < Tq = 2), and an empty row gives zeros, without NaN."""
    q, k_cache, v_cache, _ = random_qkv(3, 2, 64, 4, 2, 64, jnp.float32)
    lengths = jnp.asarray([1, 0, 40], jnp.int32)
    outs = [jax.jit(lambda q, k, v, n, s=s: decode_attention(q, k, v, n, block_k=16, num_splits=s))(
        q, k_cache, v_cache, lengths) for s in (1, 4)]
    assert_no_nan(outs)
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    out = np.asarray(outs[0])
    assert not np.any(out[0, 0]) and not np.any(out[1])
    group = 4 // 2
    expected_row0 = np.repeat(np.asarray(v_cache[0, 0]), group, axis=0)  # one visible key: its value
    np.testing.assert_allclose(out[0, 1], expected_row0, rtol=1e-6)
    assert rel_err(out, decode_reference(q, k_cache, v_cache, lengths)) < 1e-4


# ---- GPU and launcher ------------------------------------------------------------------------

@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiles the kernels for a GPU")
def test_kernels_compile_on_gpu():
    """Not interpreted: bf16, head dim 128, GQA, a ragged T, default (H100) block sizes."""
    q, k, v, d_out = random_qkv(2, 300, 300, 4, 2, 128, jnp.bfloat16)
    out, grads = output_and_grads(lambda q, k, v: flash_attention(q, k, v, interpret=False), q, k, v, d_out)
    ref_out, ref_grads = output_and_grads(attention_reference, *[x.astype(jnp.float32) for x in (q, k, v, d_out)])
    assert rel_err(out, ref_out) < 1e-2
    assert all(rel_err(g, r) < 1e-2 for g, r in zip(grads, ref_grads))
    lengths = jnp.asarray([1, 300], jnp.int32)
    dec = jax.jit(lambda *a: decode_attention(*a, interpret=False))(q[:, :1], k, v, lengths)
    assert rel_err(dec, decode_reference(q[:, :1], k, v, lengths)) < 1e-2


@pytest.mark.slow
def test_bench_attention_runs_on_cpu():
    """The launcher's CPU smoke run: xla and interpreted pallas agree, cudnn and mosaic are
    skipped with a note, decode reports every length, and the last line is JSON."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, "-m", "launch.bench_attention", "--config=tiny", "--batch=1", "--seq-len=64",
         "--decode-lengths=512,8192", "--decode-batch=1", "--iters=2", "--warmup=0", "--pallas-interpret"],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["backend"] for r in result["train"]] == ["xla", "pallas"]
    assert result["train"][1]["err"] < 1e-4 and result["train"][1]["fwd_bwd_s"] > 0
    assert [(r["cache_len"], r["backend"]) for r in result["decode"]] == [
        (512, "xla"), (512, "pallas"), (8192, "xla"), (8192, "pallas")]
    assert any("cudnn" in note for note in result["notes"])
    assert any("mosaic needs a Hopper GPU" in note for note in result["notes"])


def test_bench_attention_sweeps_mosaic_block_configs():
    """Several --mosaic-blocks configs give one timed variant each, labelled with its numbers."""
    configs = [(MgpuBlocks(64, 128, 2), MgpuBlocks(64, 64, 2)), (MgpuBlocks(64, 128, 3), MgpuBlocks(64, 128, 2))]
    labels = [label for label, _ in train_variants(["xla", "mosaic", "pallas"], BlockSizes(), configs)]
    assert labels == ["xla", "mosaic[64,128,2,64,64,2]", "mosaic[64,128,3,64,128,2]", "pallas"]
    assert [label for label, _ in train_variants(["mosaic"], BlockSizes(), configs[:1])] == ["mosaic"]
