"""Decode attention for Hopper, written for Pallas' Mosaic GPU backend.

`mgpu_decode_attention(q, k_cache, v_cache, lengths)` computes what kernels/decode_attention.py
does (same arguments, masking and split-K plan; see there) without Pallas' deprecated Triton
backend. One CTA per (KV head, cache chunk, batch row) runs two warpgroups: a producer that
streams the chunk's K and V blocks by TMA into a ring of `stages` shared-memory slots, stopping
at the row's length, and a consumer that holds the G * Tq query rows of its KV head as one
64-row wgmma tile (so each K/V block is read once for the whole group) and runs the online
softmax over the blocks. Decode is bound by memory, not by the tensor cores: the padding of a
single query row up to wgmma's 64 costs flops that are free here, while the bytes of K and V
are what the time is made of, so the ring keeps several blocks' copies in flight. Each CTA
writes an fp32 partial (o, m, l) that kernels/decode_attention.combine_partials merges.

Verified here (CPU, jax 0.10.2, tests/test_kernels_mgpu.py) as the other Mosaic GPU kernels
are: it lowers to sm_90a code for the "cuda" platform, and jax's Mosaic GPU interpreter runs it
against the dense reference with the register-level operations of kernels/mgpu_ops.py swapped
for jnp. Not verified: the compiled kernel's numbers and speed (no GPU was available).
"""
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import mgpu_ops as ops
from kernels.common import LOG2E, MASK_VALUE, cdiv, pad_axis, round_up
from kernels.decode_attention import (check_decode_inputs, combine_partials, split_count, stack_rows,
                                      unstack_rows)

ROWS = 64  # query rows per KV head the kernel takes: one wgmma tile


def mgpu_decode_attention(q, k_cache, v_cache, lengths, *, block_k: int = 128, stages: int = 2,
                          num_splits: int | None = None, interpret=None):
    """Attention output (B, Tq, H, D) in q's dtype, as kernels/decode_attention.decode_attention.
    `interpret`: None to compile, or jax's Mosaic GPU interpreter parameters (tests only)."""
    check_decode_inputs(q, k_cache, v_cache)
    batch, q_len, heads, head_dim = q.shape
    cache_len, kv_heads = k_cache.shape[1], k_cache.shape[2]
    ops.check_operands(q, k_cache, v_cache)
    if heads // kv_heads * q_len > ROWS:
        raise ValueError(f"{heads // kv_heads} query heads per KV head x {q_len} tokens exceed the kernel's "
                         f"{ROWS} rows")
    if block_k % 64 or stages < 2:
        raise ValueError(f"block_k must be a multiple of 64 and stages >= 2, got {block_k}, {stages}")
    sp = round_up(cache_len, block_k)
    splits = split_count(sp // block_k, batch * kv_heads, num_splits, interpret is not None)
    chunk_blocks = sp // block_k // splits
    stages = min(stages, chunk_blocks)
    ops.check_smem(2 * head_dim * (ROWS + 2 * stages * block_k) + 4 * ROWS * (head_dim + 2),
                   f"block_k={block_k}, stages={stages} at head dim {head_dim}")

    body, scratch = _decode_kernel(q_len=q_len, head_dim=head_dim, block_k=block_k, chunk_blocks=chunk_blocks,
                                   stages=stages, dtype=q.dtype)
    part = (batch, kv_heads, splits, ROWS)
    acc, m, l = ops.warp_specialized(
        body, scratch, consumers=1,
        out_type=[jax.ShapeDtypeStruct((*part, head_dim), jnp.float32), jax.ShapeDtypeStruct(part, jnp.float32),
                  jax.ShapeDtypeStruct(part, jnp.float32)],
        grid=(kv_heads, splits, batch), grid_names=("heads", "split", "batch"), interpret=interpret,
    )(lengths.astype(jnp.int32), stack_rows(q, kv_heads, ROWS), pad_axis(k_cache, 1, sp), pad_axis(v_cache, 1, sp))
    return unstack_rows(combine_partials(acc, m, l), q.shape).astype(q.dtype)


def _decode_kernel(*, q_len, head_dim, block_k, chunk_blocks, stages, dtype):
    score_scale = head_dim ** -0.5 * LOG2E

    def body(refs, smem, q_ready, kv_ready, kv_free):
        len_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref = refs
        q_tile, acc_tile, m_tile, l_tile, k_ring, v_ring = smem
        k_ready, v_ready = kv_ready
        b, h, split, wg = (lax.axis_index(axis) for axis in ("batch", "heads", "split", "wg"))
        length = len_ref[b]
        start = split * (chunk_blocks * block_k)
        # Blocks [0, n_full) of the chunk are visible to every query; [n_full, n_end) hold the
        # causal edge of the Tq queries; blocks past the row's length are never loaded.
        n_end = jnp.clip(cdiv(length - start, block_k), 0, chunk_blocks)
        n_full = jnp.clip(lax.div(length - q_len + 1 - start, block_k), 0, n_end)

        @pl.when(wg == 0)
        def _consume():
            plgpu.set_max_registers(ops.CONSUMER_REGISTERS, action="increase")
            plgpu.copy_gmem_to_smem(q_ref.at[b, h], q_tile, q_ready)
            plgpu.barrier_wait(q_ready)

            def step(j, carry, masked):
                acc, m, l = carry
                slot = lax.rem(j, jnp.int32(stages))
                plgpu.barrier_wait(k_ready.at[slot])
                s = ops.matmul_nt(q_tile, k_ring.at[slot]) * score_scale
                visible = None
                if masked:  # row r is token r % Tq, at position length - Tq + r % Tq
                    last = length - q_len + lax.rem(ops.iota(s.shape, 0), jnp.int32(q_len))
                    visible = start + j * block_k + ops.iota(s.shape, 1) <= last
                p, acc, m, l = ops.softmax_block(s, visible, acc, m, l)
                plgpu.barrier_wait(v_ready.at[slot])
                acc = ops.matmul_acc(acc, p.astype(dtype), v_ring.at[slot])
                plgpu.barrier_arrive(kv_free.at[slot])
                return acc, m, l

            carry = (ops.in_wgmma_layout(jnp.zeros((ROWS, head_dim), jnp.float32)),
                     ops.in_wgmma_layout(jnp.full((ROWS,), MASK_VALUE, jnp.float32)),
                     ops.in_wgmma_layout(jnp.zeros((ROWS,), jnp.float32)))
            carry = lax.fori_loop(0, n_full, lambda j, c: step(j, c, masked=False), carry)
            acc, m, l = lax.fori_loop(n_full, n_end, lambda j, c: step(j, c, masked=True), carry)
            acc_tile[...], m_tile[...], l_tile[...] = acc, m, l
            plgpu.commit_smem()
            for tile, ref in ((acc_tile, acc_ref), (m_tile, m_ref), (l_tile, l_ref)):
                plgpu.copy_smem_to_gmem(tile, ref.at[b, h, split])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 1)
        def _produce():
            load = ops.key_block_loader(k_ref, v_ref, (k_ring, v_ring), kv_ready, b, h, block_k, first_key=start)
            ops.produce_ring(n_end, stages, load, lambda slot: plgpu.barrier_wait(kv_free.at[slot]))

    kv_ring = ops.tile_smem((stages, block_k, head_dim), dtype)
    row_vector = plgpu.SMEM((ROWS,), jnp.float32)
    scratch = ((ops.tile_smem((ROWS, head_dim), dtype), ops.tile_smem((ROWS, head_dim), jnp.float32), row_vector,
                row_vector, kv_ring, kv_ring),
               plgpu.Barrier(), (plgpu.Barrier(num_barriers=stages),) * 2, plgpu.Barrier(num_barriers=stages))
    return body, scratch
