"""Causal flash attention (FlashAttention-2) in Pallas: forward, and backward as a custom VJP.

`flash_attention(q, k, v)` takes (batch, seq, heads, head_dim) with heads a multiple of the KV
heads (MHA, GQA, MQA), bf16 or fp32, and returns what nanochat_jax.attention.xla_attention
returns: scale 1/sqrt(D), fp32 scores and accumulation, and with `causal` query i sitting at key
position i + (S - T).

Forward: grid (batch, q head, q block); each program keeps its Q block and walks the KV blocks
with the online softmax, saving the base-2 log-sum-exp per row. The KV head of q head h is
h // (H / Hkv), chosen in the BlockSpec index map, so K/V are never repeated in memory. Causal
blocks past the diagonal are never visited; blocks wholly below it run without a mask, only
the diagonal (and ragged-tail) blocks pay for one.

Backward (FlashAttention-2): delta = rowsum(dO * O) in XLA, then two kernels that recompute
P = exp2(S - lse) blockwise. dQ: grid (batch, q head, q block), walking KV blocks as the
forward does. dK/dV: grid (batch, KV head, KV block); each program walks every query block of
every query head of its group and accumulates in registers. Looping over the group inside the
kernel (rather than writing per-q-head fp32 partials and summing them in XLA) costs no extra
HBM traffic or memory and needs no atomics; the price is less parallelism for MQA at small
batch (B * Hkv * S/block_k programs), which nanochat's default (GQA off) never meets.

Ragged lengths are padded up to a block multiple in the wrapper and masked in the kernel
(padded query rows are sliced off; their dO is zero, so they add nothing to dK/dV).

Verified (CPU, jax 0.10.2, `interpret=True`): outputs and dq/dk/dv against the dense
reference for bf16 and fp32, head dims 64 and 128, GQA ratios 1/2/5, ragged tails, T equal to
and one past the block size, S > T, non-causal, and block sizes that put the causal diagonal at
every offset within a block (tests/test_kernels.py). Not verified: no GPU was available, so
nothing here has been compiled for or timed on a GPU. With `interpret=False` these kernels ask
for Pallas' Triton backend (deprecated as of JAX 0.11), because the bodies use
`lax.dot_general`, which Mosaic GPU's pallas_call lowering does not implement. The Hopper path
is written for Mosaic GPU instead (`mosaic=True`): kernels/flash_attention_mgpu.py forward and
kernels/flash_attention_mgpu_bwd.py backward, with this file's residuals and log-sum-exp
convention. Default block sizes are FlashAttention-2's usual H100 starting points, not tuned.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels.common import (LOG2E, block_size, check_attention_inputs, compiler_params, default_interpret,
                            dot, init_softmax_carry, kv_block_range, online_softmax_step, pad_axis, q_block_range,
                            round_up)
from kernels.flash_attention_mgpu import check_supported, mgpu_attention_forward
from kernels.flash_attention_mgpu_bwd import BACKWARD_BLOCKS, mgpu_attention_backward
from kernels.mgpu_ops import MgpuBlocks


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    block_q: int = 128      # forward
    block_k: int = 128
    block_q_bwd: int = 64   # both backward kernels
    block_k_bwd: int = 64


def flash_attention(q, k, v, *, causal: bool = True, block_sizes: BlockSizes = BlockSizes(),
                    interpret: bool | None = None, mosaic: bool = False,
                    mosaic_blocks: tuple[MgpuBlocks, MgpuBlocks] = (MgpuBlocks(), BACKWARD_BLOCKS)):
    """Attention of q (B, T, H, D) over k, v (B, S, Hkv, D); differentiable in q, k, v.
    `mosaic`: run the Hopper kernels instead, kernels/flash_attention_mgpu.py forward and
    kernels/flash_attention_mgpu_bwd.py backward, with `mosaic_blocks` (forward, backward)."""
    if mosaic:
        check_supported(q, k, v, causal)
        if interpret:
            raise ValueError("the Mosaic GPU kernels compile for Hopper GPUs only; they cannot be interpreted here")
        return _flash(q, k, v, causal, _Mosaic(*mosaic_blocks))
    check_attention_inputs(q, k, v, causal)
    return _flash(q, k, v, causal, _Pallas(block_sizes, default_interpret() if interpret is None else interpret))


@dataclasses.dataclass(frozen=True)
class _Pallas:
    """The kernels of this file, interpreted or compiled with Triton."""
    blocks: BlockSizes
    interpret: bool

    def forward(self, q, k, v, causal):
        return _forward(q, k, v, causal, self.blocks, self.interpret)

    def backward(self, q, k, v, out, lse, d_out, causal):
        return _backward(q, k, v, out, lse, d_out, causal, self.blocks, self.interpret)


@dataclasses.dataclass(frozen=True)
class _Mosaic:
    """The Hopper kernels, written for Mosaic GPU; same residuals (out, base-2 lse) as _Pallas."""
    forward_blocks: MgpuBlocks
    backward_blocks: MgpuBlocks

    def forward(self, q, k, v, causal):
        return mgpu_attention_forward(q, k, v, causal=causal, blocks=self.forward_blocks)

    def backward(self, q, k, v, out, lse, d_out, causal):
        return mgpu_attention_backward(q, k, v, out, lse, d_out, causal=causal, blocks=self.backward_blocks)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _flash(q, k, v, causal, kernels):
    return kernels.forward(q, k, v, causal)[0]


def _flash_fwd(q, k, v, causal, kernels):
    out, lse = kernels.forward(q, k, v, causal)
    return out, (q, k, v, out, lse)


def _flash_bwd(causal, kernels, residuals, d_out):
    return kernels.backward(*residuals, d_out, causal)


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---- block ranges and masks ----------------------------------------------------------------------

def _mask(q_pos, k_pos, kv_len: int, causal: bool):
    """q_pos (rows, 1) as key positions, k_pos (1, cols): real keys, and not in the future."""
    visible = k_pos < kv_len
    return visible & (k_pos <= q_pos) if causal else visible


def _iota(shape, dim):
    return lax.broadcasted_iota(jnp.int32, shape, dim)


# ---- forward ---------------------------------------------------------------------------------

def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, causal, q_len, kv_len, block_k, scale):
    block_q, head_dim = q_ref.shape
    first_pos = pl.program_id(2) * block_q + (kv_len - q_len)
    q_pos = first_pos + _iota((block_q, 1), 0)
    q = q_ref[...]

    def body(j, carry, masked):
        start = pl.multiple_of(j * block_k, block_k)
        s = dot(q, k_ref[pl.ds(start, block_k), :], (1, 1)) * (scale * LOG2E)
        mask = _mask(q_pos, start + _iota((1, block_k), 1), kv_len, causal) if masked else None
        return online_softmax_step(carry, s, v_ref[pl.ds(start, block_k), :], mask)

    n_full, n_end = kv_block_range(first_pos, block_q, block_k, kv_len, causal)
    carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), init_softmax_carry(block_q, head_dim))
    acc, m, l = lax.fori_loop(n_full, n_end, functools.partial(body, masked=True), carry)
    # Every row sees key 0 (S >= T), so l >= 1: no division by zero, no log of zero.
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log2(l)


def _forward(q, k, v, causal, blocks, interpret):
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    bq, bk = block_size(blocks.block_q, q_len), block_size(blocks.block_k, kv_len)
    tp, sp = round_up(q_len, bq), round_up(kv_len, bk)
    q_spec = pl.BlockSpec((None, bq, None, head_dim), lambda b, h, i: (b, i, h, 0))
    kv_spec = pl.BlockSpec((None, sp, None, head_dim), lambda b, h, i: (b, 0, h // group, 0))
    kernel = functools.partial(_fwd_kernel, causal=causal, q_len=q_len, kv_len=kv_len, block_k=bk,
                               scale=head_dim ** -0.5)
    out, lse = pl.pallas_call(
        kernel,
        grid=(batch, heads, tp // bq),
        in_specs=[q_spec, kv_spec, kv_spec],
        out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct((batch, tp, heads, head_dim), q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, tp), jnp.float32)],
        compiler_params=compiler_params(interpret, num_warps=4 if head_dim <= 64 else 8),
        interpret=interpret,
        name="flash_attention_fwd",
    )(pad_axis(q, 1, tp), pad_axis(k, 1, sp), pad_axis(v, 1, sp))
    return out[:, :q_len], lse[:, :, :q_len]


# ---- backward --------------------------------------------------------------------------------

def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, causal, q_len, kv_len,
               block_k, scale):
    block_q, head_dim = q_ref.shape
    first_pos = pl.program_id(2) * block_q + (kv_len - q_len)
    q_pos = first_pos + _iota((block_q, 1), 0)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]

    def body(j, dq, masked):
        start = pl.multiple_of(j * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        p = jnp.exp2(dot(q, k, (1, 1)) * (scale * LOG2E) - lse)
        if masked:
            p = jnp.where(_mask(q_pos, start + _iota((1, block_k), 1), kv_len, causal), p, 0.0)
        ds = p * (dot(do, v_ref[pl.ds(start, block_k), :], (1, 1)) - delta)
        return dq + dot(ds.astype(k.dtype), k)

    n_full, n_end = kv_block_range(first_pos, block_q, block_k, kv_len, causal)
    dq = lax.fori_loop(0, n_full, functools.partial(body, masked=False), jnp.zeros((block_q, head_dim), jnp.float32))
    dq = lax.fori_loop(n_full, n_end, functools.partial(body, masked=True), dq)
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, causal, q_len,
                 kv_len, block_q, scale):
    """One KV block of one KV head; q_ref/do_ref hold the whole sequence of the group's query
    heads (T, G, D), lse_ref/delta_ref (G, T)."""
    block_k, head_dim = k_ref.shape
    group, n_q = q_ref.shape[1], q_ref.shape[0] // block_q
    start_k = pl.program_id(2) * block_k
    k_pos = start_k + _iota((1, block_k), 1)
    k, v = k_ref[...], v_ref[...]

    def body(i, carry, g, masked):
        dk, dv = carry
        start = pl.multiple_of(i * block_q, block_q)
        q = q_ref[pl.ds(start, block_q), g, :]
        do = do_ref[pl.ds(start, block_q), g, :]
        lse = lse_ref[g, pl.ds(start, block_q)][:, None]
        delta = delta_ref[g, pl.ds(start, block_q)][:, None]
        p = jnp.exp2(dot(q, k, (1, 1)) * (scale * LOG2E) - lse)
        if masked:
            q_pos = start + (kv_len - q_len) + _iota((block_q, 1), 0)
            p = jnp.where(_mask(q_pos, k_pos, kv_len, causal), p, 0.0)
        dv = dv + dot(p.astype(do.dtype), do, (0, 0))
        ds = p * (dot(do, v, (1, 1)) - delta)
        return dk + dot(ds.astype(q.dtype), q, (0, 0)), dv

    lo, mid = q_block_range(start_k, block_q, block_k, n_q, q_len, kv_len, causal)

    def over_group(g, carry):
        carry = lax.fori_loop(lo, mid, functools.partial(body, g=g, masked=True), carry)
        return lax.fori_loop(mid, n_q, functools.partial(body, g=g, masked=False), carry)

    zeros = jnp.zeros((block_k, head_dim), jnp.float32)
    dk, dv = lax.fori_loop(0, group, over_group, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward(q, k, v, out, lse, d_out, causal, blocks, interpret):
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    bq, bk = block_size(blocks.block_q_bwd, q_len), block_size(blocks.block_k_bwd, kv_len)
    tp, sp = round_up(q_len, bq), round_up(kv_len, bk)
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), d_out.astype(jnp.float32))
    qp, dop = pad_axis(q, 1, tp), pad_axis(d_out, 1, tp)
    kp, vp = pad_axis(k, 1, sp), pad_axis(v, 1, sp)
    lse, delta = pad_axis(lse, 2, tp), pad_axis(delta, 2, tp)
    static = dict(causal=causal, q_len=q_len, kv_len=kv_len, scale=head_dim ** -0.5)
    params = compiler_params(interpret, num_warps=4 if head_dim <= 64 else 8)

    q_block = pl.BlockSpec((None, bq, None, head_dim), lambda b, h, i: (b, i, h, 0))
    kv_whole = pl.BlockSpec((None, sp, None, head_dim), lambda b, h, i: (b, 0, h // group, 0))
    row_block = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, block_k=bk, **static),
        grid=(batch, heads, tp // bq),
        in_specs=[q_block, kv_whole, kv_whole, q_block, row_block, row_block],
        out_specs=q_block,
        out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        compiler_params=params, interpret=interpret, name="flash_attention_dq",
    )(qp, kp, vp, dop, lse, delta)

    q_group = pl.BlockSpec((None, tp, group, head_dim), lambda b, h, j: (b, 0, h, 0))
    kv_block = pl.BlockSpec((None, bk, None, head_dim), lambda b, h, j: (b, j, h, 0))
    row_group = pl.BlockSpec((None, group, tp), lambda b, h, j: (b, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, block_q=bq, **static),
        grid=(batch, kv_heads, sp // bk),
        in_specs=[q_group, kv_block, kv_block, q_group, row_group, row_group],
        out_specs=[kv_block, kv_block],
        out_shape=[jax.ShapeDtypeStruct(kp.shape, k.dtype), jax.ShapeDtypeStruct(vp.shape, v.dtype)],
        compiler_params=params, interpret=interpret, name="flash_attention_dkdv",
    )(qp, kp, vp, dop, lse, delta)
    return dq[:, :q_len], dk[:, :kv_len], dv[:, :kv_len]
