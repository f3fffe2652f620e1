"""Decode attention in Pallas: a few new queries against a KV cache with per-row valid lengths.

`decode_attention(q, k_cache, v_cache, lengths)`: q (B, Tq, H, D), caches (B, S, Hkv, D),
lengths (B,) int32 in [0, S]. The Tq queries of row b are the last Tq positions of its valid
prefix: query t sits at position lengths[b] - Tq + t and sees cache positions
0 .. lengths[b] - Tq + t (a query that would sit before position 0 sees nothing and gives 0).
Positions at or past lengths[b] may hold stale data, as long as it is finite: they are masked
out, and blocks wholly past the length are not even read.

Split-K (flash-decoding): with one query token per row there is too little work per (row, KV
head) to fill a GPU, so the cache is cut into `num_splits` chunks along S; grid (batch, KV head,
chunk), each program writing an unnormalised partial (o, m, l) that XLA then combines with the
usual log-sum-exp rescaling. Chunks wholly past a row's length exit at once. The split count
defaults to enough programs for about two waves on an H100 (132 SMs), 1 when the batch alone
fills it (and 1 when interpreted).

GQA: one program serves all G = H / Hkv query heads of its KV head, so each K/V tile is read
from memory once for the whole group: the G x Tq queries are stacked as rows of one matrix.

The model's cached steps (the engine's prefill chunks and decode steps) run it when
`model.attention` is pallas, and its Mosaic GPU version (kernels/decode_attention_mgpu.py, which
shares the row stacking, split plan and combine below) when it is mosaic.

Verified on CPU with `interpret=True` against a dense reference and against xla_attention on
each row's sliced prefix (tests/test_kernels.py), and through the model and the engine against
their xla results (tests/test_model.py, tests/test_engine.py). Not compiled or timed on a GPU
(none was available); on GPU it asks for Pallas' Triton backend, as kernels/flash_attention.py
explains, which the Mosaic GPU version avoids on Hopper.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels.common import (LOG2E, MIN_BLOCK, block_size, cdiv, compiler_params, default_interpret, dot,
                            init_softmax_carry, online_softmax_step, pad_axis, round_up)

TARGET_PROGRAMS = 2 * 132  # two waves on an H100's 132 SMs


def decode_attention(q, k_cache, v_cache, lengths, *, block_k: int = 128, num_splits: int | None = None,
                     interpret: bool | None = None):
    """Attention output (B, Tq, H, D) in q's dtype. `num_splits` is rounded down to a divisor
    of the number of KV blocks; None picks it from the batch and KV heads (1 when interpreted)."""
    check_decode_inputs(q, k_cache, v_cache)
    batch, q_len, heads, head_dim = q.shape
    cache_len, kv_heads = k_cache.shape[1], k_cache.shape[2]
    interpret = default_interpret() if interpret is None else interpret
    bk = block_size(block_k, cache_len)
    sp = round_up(cache_len, bk)  # a cache length that is a block multiple is never copied
    splits = split_count(sp // bk, batch * kv_heads, num_splits, interpret)
    chunk = sp // splits
    padded_rows = max(MIN_BLOCK, pl.next_power_of_2(heads // kv_heads * q_len))

    part = (batch, kv_heads, splits, padded_rows)
    acc, m, l = pl.pallas_call(
        functools.partial(_decode_kernel, q_len=q_len, block_k=bk, scale=head_dim ** -0.5),
        grid=(batch, kv_heads, splits),
        in_specs=[
            pl.BlockSpec((None,), lambda b, h, s: (b,)),
            pl.BlockSpec((None, None, padded_rows, head_dim), lambda b, h, s: (b, h, 0, 0)),
            pl.BlockSpec((None, chunk, None, head_dim), lambda b, h, s: (b, s, h, 0)),
            pl.BlockSpec((None, chunk, None, head_dim), lambda b, h, s: (b, s, h, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, padded_rows, head_dim), lambda b, h, s: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, padded_rows), lambda b, h, s: (b, h, s, 0)),
            pl.BlockSpec((None, None, None, padded_rows), lambda b, h, s: (b, h, s, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct((*part, head_dim), jnp.float32),
                   jax.ShapeDtypeStruct(part, jnp.float32), jax.ShapeDtypeStruct(part, jnp.float32)],
        compiler_params=compiler_params(interpret, num_warps=4),
        interpret=interpret,
        name="decode_attention",
    )(lengths.astype(jnp.int32), stack_rows(q, kv_heads, padded_rows), pad_axis(k_cache, 1, sp),
      pad_axis(v_cache, 1, sp))
    return unstack_rows(combine_partials(acc, m, l), q.shape).astype(q.dtype)


def check_decode_inputs(q, k_cache, v_cache):
    if k_cache.shape != v_cache.shape or k_cache.shape[0] != q.shape[0] or k_cache.shape[3] != q.shape[3]:
        raise ValueError(f"expected caches (B, S, Hkv, D) matching q {q.shape}; got {k_cache.shape}, {v_cache.shape}")
    if q.shape[2] % k_cache.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k_cache.shape[2]} KV heads")


def split_count(n_blocks: int, programs: int, requested: int | None, interpret) -> int:
    """Chunks to cut the cache's n_blocks into: a divisor of n_blocks, at most `requested`, by
    default enough for TARGET_PROGRAMS over the `programs` (batch x KV heads) there are."""
    if requested is None:  # an interpreter runs programs one by one: splitting only adds work
        requested = 1 if interpret else -(-TARGET_PROGRAMS // programs)
    return max(d for d in range(1, min(n_blocks, max(requested, 1)) + 1) if n_blocks % d == 0)


def stack_rows(q, kv_heads: int, padded_rows: int):
    """q (B, Tq, H, D) as one (padded_rows, D) matrix per KV head, (B, Hkv, padded_rows, D): row r
    is query head r // Tq of the group, token r % Tq; rows past G * Tq are zero."""
    batch, q_len, heads, head_dim = q.shape
    rows = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim).transpose(0, 2, 3, 1, 4)
    return pad_axis(rows.reshape(batch, kv_heads, heads // kv_heads * q_len, head_dim), 2, padded_rows)


def unstack_rows(out, q_shape):
    """The inverse of stack_rows: (B, Hkv, padded_rows, D) back to q_shape (B, Tq, H, D)."""
    batch, q_len, heads, head_dim = q_shape
    kv_heads = out.shape[1]
    out = out[:, :, :heads // kv_heads * q_len].reshape(batch, kv_heads, heads // kv_heads, q_len, head_dim)
    return out.transpose(0, 3, 1, 2, 4).reshape(q_shape)


def combine_partials(acc, m, l):
    """Merge split partials along axis 2: acc (..., splits, rows, D), base-2 max m and sum l
    (..., splits, rows). Rows that saw no key anywhere (l = 0) give 0."""
    weight = jnp.exp2(m - jnp.max(m, axis=2, keepdims=True))
    total = jnp.sum(l * weight, axis=2)
    out = jnp.sum(acc * weight[..., None], axis=2)
    return out / jnp.where(total == 0, 1.0, total)[..., None]


def _decode_kernel(len_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, *, q_len, block_k, scale):
    rows, head_dim = q_ref.shape
    chunk = k_ref.shape[0]
    length = len_ref[...]
    start = pl.program_id(2) * chunk
    last_visible = length - q_len + lax.rem(lax.broadcasted_iota(jnp.int32, (rows, 1), 0), q_len)
    q = q_ref[...]

    def body(j, carry, masked):
        offset = pl.multiple_of(j * block_k, block_k)
        s = dot(q, k_ref[pl.ds(offset, block_k), :], (1, 1)) * (scale * LOG2E)
        k_pos = start + offset + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        return online_softmax_step(carry, s, v_ref[pl.ds(offset, block_k), :],
                                   (k_pos <= last_visible) if masked else None)

    # Blocks [0, n_full) are visible to every row; [n_full, n_end) hold the causal edge of the
    # Tq queries; blocks past the length are skipped. Both bounds clip to [0, blocks per chunk].
    n_end = jnp.clip(cdiv(length - start, block_k), 0, chunk // block_k)
    n_full = jnp.clip(lax.div(length - q_len + 1 - start, block_k), 0, n_end)
    carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), init_softmax_carry(rows, head_dim))
    acc, m, l = lax.fori_loop(n_full, n_end, functools.partial(body, masked=True), carry)
    acc_ref[...], m_ref[...], l_ref[...] = acc, m, l
