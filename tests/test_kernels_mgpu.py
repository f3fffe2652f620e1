"""The Mosaic GPU (Hopper) attention kernels, flash forward and backward and decode, checked
without a GPU in two halves.

1. Lowering: each kernel is lowered for the "cuda" platform on this CPU-only machine, through
   Mosaic GPU down to its sm_90a module, which must hold wgmma, TMA and mbarrier instructions.
   This is where layouts, tile shapes and transforms are checked.
2. Protocol: jax's Mosaic GPU interpreter runs the kernels on CPU, with real TMA copies,
   barriers (it fails on a phase a waiting thread never saw, and hangs on a wait that never
   completes, which pytest-timeout turns into a failure), the rings of slots, the ping-pong
   between consumers, skipped blocks, masks and the output writes. It lacks layout casts, iota
   and vector loads in wgmma layouts and wgmma with transposed or register operands, so those
   register-level operations (kernels/mgpu_ops.py) are swapped for plain jnp equivalents here;
   they are what this test does not check.
On a GPU the compiled kernels are compared with the reference (skipped here).
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from kernels import flash_attention_mgpu as mgpu
from kernels import decode_attention_mgpu as mgpu_decode
from kernels import flash_attention_mgpu_bwd as mgpu_bwd
from kernels import mgpu_ops as ops
from kernels.decode_attention import decode_attention
from kernels.flash_attention import flash_attention
from kernels.reference import attention_reference
from nanochat_jax import model as model_lib



def random_qkv(batch, q_len, kv_len, heads, kv_heads, head_dim, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim), jnp.bfloat16)
    k = jax.random.normal(keys[1], (batch, kv_len, kv_heads, head_dim), jnp.bfloat16)
    v = jax.random.normal(keys[2], (batch, kv_len, kv_heads, head_dim), jnp.bfloat16)
    return q, k, v


def reference_lse(q, k, causal):
    """Base-2 log-sum-exp of the scaled scores per (batch, head, query), in float64."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    k = np.repeat(k, q.shape[2] // k.shape[2], axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) * q.shape[-1] ** -0.5
    if causal:
        s = np.where(np.tri(q.shape[1], k.shape[1], k.shape[1] - q.shape[1], bool), s, -np.inf)
    top = s.max(-1, keepdims=True)
    return (top[..., 0] + np.log(np.exp(s - top).sum(-1))) / np.log(2)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


LOWER_CASES = {  # batch, T, S, H, Hkv, D, causal
    "d20": (32, 2048, 2048, 10, 10, 128, True),
    "d12-blocks": (32, 2048, 2048, 6, 6, 128, True),
    "gqa2-ragged-d64": (2, 300, 300, 4, 2, 64, True),
    "mqa5-more-keys": (1, 130, 333, 5, 1, 128, True),
    "not-causal": (1, 200, 333, 2, 1, 64, False),
}


@pytest.mark.parametrize("case", LOWER_CASES)
def test_forward_lowers_for_hopper(case):
    batch, q_len, kv_len, heads, kv_heads, head_dim, causal = LOWER_CASES[case]
    q = jax.ShapeDtypeStruct((batch, q_len, heads, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((batch, kv_len, kv_heads, head_dim), jnp.bfloat16)
    forward = jax.jit(lambda q, k, v: mgpu.mgpu_attention_forward(q, k, v, causal=causal))
    module = forward.trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in module
    instructions = set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k16\.f32\.bf16\.bf16", module))
    assert instructions == {"128", str(head_dim)}  # S = Q K^T (N = block_k) and O += P V (N = D)
    assert "cp.async.bulk.tensor" in module and "mbarrier" in module


@pytest.mark.parametrize("case", LOWER_CASES)
def test_backward_lowers_for_hopper(case):
    batch, q_len, kv_len, heads, kv_heads, head_dim, causal = LOWER_CASES[case]
    q = jax.ShapeDtypeStruct((batch, q_len, heads, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((batch, kv_len, kv_heads, head_dim), jnp.bfloat16)
    lse = jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32)
    backward = jax.jit(lambda *args: mgpu_bwd.mgpu_attention_backward(*args, causal=causal))
    module = backward.trace(q, kv, kv, q, lse, q).lower(lowering_platforms=("cuda",)).as_text()
    assert re.findall(r"custom_call @([\w$.]+)\(", module) == ["mosaic_gpu_v2"] * 2  # dQ, then dK/dV
    instructions = set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k16\.f32\.bf16\.bf16", module))
    assert instructions == {"64", str(head_dim)}  # S, dP (N = block) and dQ, dK, dV (N = D)
    assert "cp.async.bulk.tensor" in module and "mbarrier" in module


def test_mosaic_backend_lowers_without_triton():
    """flash_attention(mosaic=True) under jax.vjp is three Mosaic GPU kernels (forward, dQ,
    dK/dV) and nothing from Pallas' deprecated Triton backend."""
    q = jax.ShapeDtypeStruct((2, 300, 4, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 300, 2, 128), jnp.bfloat16)

    def forward_backward(q, k, v, d_out):
        out, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, interpret=False, mosaic=True), q, k, v)
        return out, vjp(d_out)
    module = jax.jit(forward_backward).trace(q, kv, kv, q).lower(lowering_platforms=("cuda",)).as_text()
    calls = re.findall(r"custom_call @([\w$.]+)\(", module)
    assert calls == ["mosaic_gpu_v2"] * 3, calls
    with pytest.raises(ValueError, match="cannot be interpreted"):
        flash_attention(jnp.zeros((1, 64, 2, 64), jnp.bfloat16), *[jnp.zeros((1, 64, 2, 64), jnp.bfloat16)] * 2,
                        interpret=True, mosaic=True)


@pytest.fixture
def register_ops_in_jnp(monkeypatch):
    def qkt(q_tile, k_tile, then=None):
        s = jnp.dot(q_tile[...], k_tile[...].T, preferred_element_type=jnp.float32)
        if then is not None:
            then()
        return s
    monkeypatch.setattr(ops, "matmul_nt", qkt)
    monkeypatch.setattr(ops, "matmul_acc", lambda acc, p, v_tile: acc + jnp.dot(
        p, v_tile[...], preferred_element_type=jnp.float32))
    monkeypatch.setattr(ops, "iota", lambda shape, dim: lax.broadcasted_iota(jnp.int32, shape, dim))
    monkeypatch.setattr(ops, "in_wgmma_layout", lambda x: x)
    monkeypatch.setattr(ops, "load_vector", lambda ref, along: ref[...])


PROTOCOL_CASES = {  # batch, T, S, H, Hkv, D, causal, blocks
    # 64-key blocks: the first consumer of each CTA needs one block fewer and skips it
    "skip-blocks-gqa2": (1, 192, 192, 4, 2, 64, True, mgpu.MgpuBlocks(64, 64, 2)),
    # 5 blocks through a 3-slot ring: refills and the final drain; MQA with 5 query heads
    "ring-mqa5-d128": (1, 320, 320, 5, 1, 128, True, mgpu.MgpuBlocks(64, 64, 3)),
    "ragged-more-keys": (2, 130, 333, 2, 2, 64, True, mgpu.MgpuBlocks()),
    "not-causal-ragged": (1, 100, 333, 2, 1, 64, False, mgpu.MgpuBlocks()),
}


@pytest.mark.parametrize("case", PROTOCOL_CASES)
def test_forward_protocol_interpreted(case, register_ops_in_jnp):
    # The interpreter is private API of jax 0.10; skip (not fail) where it moved or went.
    params = pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.params")
    interpreter = pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call")
    batch, q_len, kv_len, heads, kv_heads, head_dim, causal, blocks = PROTOCOL_CASES[case]
    q, k, v = random_qkv(batch, q_len, kv_len, heads, kv_heads, head_dim)
    try:
        out, lse = mgpu.mgpu_attention_forward(q, k, v, causal=causal, blocks=blocks,
                                               interpret=params.InterpretGPUParams())
    finally:  # the interpreter keeps global state that a failure leaves dirty
        interpreter.reset_gpu_interpret_mode_state()
    want = attention_reference(*[x.astype(jnp.float32) for x in (q, k, v)], causal=causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, want) < 1e-2
    np.testing.assert_allclose(lse, reference_lse(q, k, causal), rtol=1e-4, atol=1e-3)


BACKWARD_CASES = {  # batch, T, S, H, Hkv, D, causal, blocks
    # both kernels skip: dQ's first consumer needs one key block fewer, dK/dV's second consumer
    # one query block fewer
    "skip-blocks-gqa2": (1, 192, 192, 4, 2, 64, True, mgpu.MgpuBlocks(64, 64, 2)),
    # dK/dV streams the query blocks of 5 heads through a 3-slot ring; ragged T and S > T
    "ring-mqa5-more-keys": (1, 130, 333, 5, 1, 64, True, mgpu.MgpuBlocks(64, 64, 3)),
    "not-causal-d128": (1, 100, 150, 2, 1, 128, False, mgpu.MgpuBlocks(64, 64, 2)),
}


def reference_gradients(q, k, v, d_out, causal):
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    out, vjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, causal=causal), *f32)
    return out, vjp(d_out.astype(jnp.float32))


@pytest.mark.parametrize("case", BACKWARD_CASES)
def test_backward_protocol_interpreted(case, register_ops_in_jnp):
    """The backward kernels against the reference gradients, given the reference's output and
    log-sum-exp (so a forward bug cannot hide a backward one)."""
    params = pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.params")
    interpreter = pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call")
    batch, q_len, kv_len, heads, kv_heads, head_dim, causal, blocks = BACKWARD_CASES[case]
    q, k, v = random_qkv(batch, q_len, kv_len, heads, kv_heads, head_dim)
    d_out = jax.random.normal(jax.random.key(1), q.shape, q.dtype)
    out, want = reference_gradients(q, k, v, d_out, causal)
    lse = jnp.asarray(reference_lse(q, k, causal), jnp.float32)
    try:
        got = mgpu_bwd.mgpu_attention_backward(q, k, v, out.astype(q.dtype), lse, d_out, causal=causal,
                                               blocks=blocks, interpret=params.InterpretGPUParams())
    finally:
        interpreter.reset_gpu_interpret_mode_state()
    for name, g, w, x in zip("qkv", got, want, (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype, name
        assert rel_err(g, w) < 1e-2, name


DECODE_CASES = {  # batch, Tq, S, H, Hkv, D
    "d20-b8-8192": (8, 1, 8192, 10, 10, 128),
    "gqa2-tq3-ragged-d64": (3, 3, 700, 4, 2, 64),
}


@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_lowers_for_hopper(case):
    batch, q_len, cache_len, heads, kv_heads, head_dim = DECODE_CASES[case]
    q = jax.ShapeDtypeStruct((batch, q_len, heads, head_dim), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((batch, cache_len, kv_heads, head_dim), jnp.bfloat16)
    lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)
    module = jax.jit(mgpu_decode.mgpu_decode_attention).trace(q, cache, cache, lengths).lower(
        lowering_platforms=("cuda",)).as_text()
    assert re.findall(r"custom_call @([\w$.]+)\(", module) == ["mosaic_gpu_v2"]
    instructions = set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k16\.f32\.bf16\.bf16", module))
    assert instructions == {"128", str(head_dim)}  # S = Q K^T (N = block_k) and O += P V (N = D)
    assert "cp.async.bulk.tensor" in module and "mbarrier" in module


@pytest.mark.parametrize("splits", [1, 3])
def test_decode_protocol_interpreted(splits, register_ops_in_jnp):
    """Per-row lengths across chunk and block edges (full cache, mid-block, one key, none: a
    query before position 0 gives 0), GQA with Tq=3 rows per head, against the Pallas kernel's
    float32 reference path."""
    params = pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.params")
    interpreter = pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call")
    q, k, v = random_qkv(4, 3, 700, 4, 2, 64)
    lengths = jnp.array([700, 130, 1, 0], jnp.int32)
    want = decode_attention(*[x.astype(jnp.float32) for x in (q, k, v)], lengths, interpret=True)
    try:
        got = mgpu_decode.mgpu_decode_attention(q, k, v, lengths, num_splits=splits,
                                                interpret=params.InterpretGPUParams())
    finally:
        interpreter.reset_gpu_interpret_mode_state()
    assert got.shape == q.shape and got.dtype == q.dtype
    assert not np.isnan(np.asarray(got, np.float32)).any()
    assert rel_err(got, want) < 1e-2
    np.testing.assert_array_equal(np.asarray(got[3], np.float32), 0.0)  # length 0: nothing visible


def test_unsupported_inputs_are_refused():
    q, k, v = random_qkv(1, 64, 64, 2, 2, 64)
    with pytest.raises(ValueError, match="bf16/fp16"):
        mgpu.check_supported(q.astype(jnp.float32), k, v, True)
    with pytest.raises(ValueError, match="multiple of 64"):
        mgpu.check_supported(q[..., :32], k[..., :32], v[..., :32], True)
    with pytest.raises(ValueError, match="at least as many keys"):
        mgpu.check_supported(q, k[:, :32], v[:, :32], True)
    with pytest.raises(ValueError, match="multiples of 64"):
        mgpu.MgpuBlocks(block_q=32)
    q, k, v = random_qkv(1, 256, 256, 2, 2, 256)
    with pytest.raises(ValueError, match="shared memory"):
        mgpu.mgpu_attention_forward(q, k, v)  # 2 stages of 128 x 256 K and V tiles: 320 KB
    with pytest.raises(ValueError, match="shared memory"):  # dQ: Q, dO, K and V tiles of 64 x 256: 256 KB
        mgpu_bwd.mgpu_attention_backward(q, k, v, q, jnp.zeros((1, 2, 256), jnp.float32), q)
    q, k, v = random_qkv(1, 20, 256, 4, 1, 64)
    with pytest.raises(ValueError, match="exceed the kernel's 64 rows"):  # 4 heads x 20 tokens
        mgpu_decode.mgpu_decode_attention(q, k, v, jnp.array([256]))
    with pytest.raises(ValueError, match="bf16/fp16"):
        mgpu_decode.mgpu_decode_attention(q.astype(jnp.float32), k, v, jnp.array([256]))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="runs the compiled kernels on a Hopper GPU")
@pytest.mark.parametrize("case", [name for name, case in LOWER_CASES.items() if case[0] * case[1] <= 4096])
def test_compiled_kernels_match_reference_on_gpu(case):
    batch, q_len, kv_len, heads, kv_heads, head_dim, causal = LOWER_CASES[case]
    q, k, v = random_qkv(batch, q_len, kv_len, heads, kv_heads, head_dim)
    d_out = jax.random.normal(jax.random.key(1), q.shape, q.dtype)
    out, lse = jax.jit(lambda q, k, v: mgpu.mgpu_attention_forward(q, k, v, causal=causal))(q, k, v)
    want_out, want_grads = reference_gradients(q, k, v, d_out, causal)
    assert rel_err(out, want_out) < 1e-2
    np.testing.assert_allclose(lse, reference_lse(q, k, causal), rtol=1e-3, atol=1e-2)
    _, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, causal=causal, mosaic=True), q, k, v)
    for name, got, want in zip("qkv", jax.jit(vjp)(d_out), want_grads):
        assert rel_err(got, want) < 1e-2, name


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="runs the compiled kernel on a Hopper GPU")
@pytest.mark.parametrize("case", DECODE_CASES)
def test_compiled_decode_matches_reference_on_gpu(case):
    batch, q_len, cache_len, heads, kv_heads, head_dim = DECODE_CASES[case]
    q, k, v = random_qkv(batch, q_len, cache_len, heads, kv_heads, head_dim)
    lengths = jax.random.randint(jax.random.key(2), (batch,), 0, cache_len + 1).at[0].set(cache_len)
    want = decode_attention(*[x.astype(jnp.float32) for x in (q, k, v)], lengths)
    got = jax.jit(mgpu_decode.mgpu_decode_attention)(q, k, v, lengths)
    assert rel_err(got, want) < 1e-2


def test_model_with_mosaic_attention_lowers_for_hopper():
    """model.attention=mosaic end to end: the loss gradient is 3 Mosaic GPU kernels per layer
    (forward, dQ, dK/dV) and the KV-cache decode step one decode kernel per layer, no Triton."""
    cfg = model_lib.GPTConfig(vocab_size=256, n_layer=2, dim=256, n_head=4, n_kv_head=2, sequence_len=256,
                              compute_dtype="bfloat16", attention="mosaic")
    graphdef, params, _ = model_lib.abstract_model(cfg)
    tokens = jax.ShapeDtypeStruct((2, 256), jnp.int32)
    grad = jax.jit(jax.grad(lambda p, x, y: model_lib.loss_fn(graphdef, p, x, y)))
    module = grad.trace(params, tokens, tokens).lower(lowering_platforms=("cuda",)).as_text()
    assert re.findall(r"custom_call @([\w$.]+)\(", module).count("mosaic_gpu_v2") == 3 * cfg.n_layer
    assert "triton" not in module

    cache = jax.eval_shape(lambda: model_lib.empty_cache(cfg, 2, 256))
    step = jax.jit(lambda p, x, c, pos: model_lib.decode(graphdef, p, x, c, pos))
    module = step.trace(params, jax.ShapeDtypeStruct((2, 1), jnp.int32), cache,
                        jax.ShapeDtypeStruct((2, 1), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
    assert re.findall(r"custom_call @([\w$.]+)\(", module).count("mosaic_gpu_v2") == cfg.n_layer
    assert "triton" not in module
