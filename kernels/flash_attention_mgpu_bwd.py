"""Causal flash attention backward for Hopper, written for Pallas' Mosaic GPU backend.

`mgpu_attention_backward(q, k, v, out, lse, d_out)` returns (dq, dk, dv) for the forward of
kernels/flash_attention_mgpu.py (or the interpreted one of kernels/flash_attention.py: both give
the base-2 log-sum-exp it takes). Shapes and dtypes as there: q, out, d_out (B, T, H, D),
k, v (B, S, Hkv, D), lse (B, H, T) fp32; the gradients come back in the inputs' dtypes.

FlashAttention-2's split into two kernels, each laid out like the forward: a producer
warpgroup streams tiles by TMA into a ring of shared-memory slots ("ready" barriers completed
by the copies, a "free" barrier both consumers arrive on), and two consumer warpgroups run
wgmma from shared memory and registers, recomputing P = exp2(S - lse) blockwise.
- dQ: one CTA per (q head, 2 * block_q query rows, batch). Each consumer keeps its Q, dO, lse
  and delta = rowsum(dO * O) for the whole walk over the key blocks the producer streams:
  S = Q K^T, dP = dO V^T, dS = P (dP - delta), dQ += dS K.
- dK/dV: one CTA per (KV head, 2 * block_k keys, batch). Each consumer keeps its K and V tiles
  and its dK, dV accumulators in registers while the producer streams Q, dO, lse and delta
  blocks of every query head in the KV head's group, so GQA/MQA sums the group's contributions
  in registers (no per-query-head partials, no atomics): S^T = K Q^T, dV += P^T dO,
  dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q.
Causal blocks that see nothing are never loaded; only the diagonal blocks build a mask. A
consumer whose range is shorter than its CTA's (the later rows of dQ need more key blocks, the
earlier keys of dK/dV more query blocks) waits for and releases the blocks it skips, so that
every barrier phase is observed.

Verified here (CPU, jax 0.10.2, tests/test_kernels_mgpu.py), as the forward is: both kernels
lower through Mosaic GPU to sm_90a code for the "cuda" platform, and jax's Mosaic GPU interpreter
runs their copy and barrier protocol against the reference gradients with the register-level
operations of kernels/mgpu_ops.py swapped for jnp. Not verified: the compiled kernels' numbers
and speed (no GPU was available); a GPU test compares them with the reference and skips here.
"""
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import mgpu_ops as ops
from kernels.common import LOG2E, kv_block_range, pad_axis, q_block_range, round_up
from kernels.flash_attention_mgpu import check_supported
from kernels.mgpu_ops import CONSUMERS, MgpuBlocks

BACKWARD_BLOCKS = MgpuBlocks(block_q=64, block_k=64, stages=2)  # FA3's Hopper starting point at D=128


def mgpu_attention_backward(q, k, v, out, lse, d_out, *, causal: bool = True,
                            blocks: MgpuBlocks = BACKWARD_BLOCKS, interpret=None):
    """(dq, dk, dv) as described in the module docstring. `interpret`: None to compile, or jax's
    Mosaic GPU interpreter parameters (tests only)."""
    check_supported(q, k, v, causal)
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    bq, bk = blocks.block_q, blocks.block_k
    # Both kernels tile both sequences: dQ CTAs take CONSUMERS * bq rows in steps of bk keys,
    # dK/dV CTAs CONSUMERS * bk keys in steps of bq rows.
    tp, sp = round_up(q_len, CONSUMERS * bq), round_up(kv_len, CONSUMERS * bk)
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), d_out.astype(jnp.float32))
    args = (pad_axis(q, 1, tp), pad_axis(k, 1, sp), pad_axis(v, 1, sp), pad_axis(d_out.astype(q.dtype), 1, tp),
            pad_axis(lse, 2, tp), pad_axis(delta, 2, tp))
    static = dict(q_len=q_len, kv_len=kv_len, group=group, head_dim=head_dim, block_q=bq, block_k=bk,
                  causal=causal, dtype=q.dtype)

    stages = min(blocks.stages, sp // bk)
    ops.check_smem(2 * head_dim * (2 * CONSUMERS * bq + 2 * stages * bk) + 8 * CONSUMERS * bq,
                   f"{blocks} at head dim {head_dim}")
    dq = ops.warp_specialized(
        *_dq_kernel(stages=stages, **static),
        out_type=jax.ShapeDtypeStruct((batch, tp, heads, head_dim), q.dtype),
        grid=(heads, tp // (CONSUMERS * bq), batch), grid_names=("heads", "q_tile", "batch"), interpret=interpret,
    )(*args)

    stages = min(blocks.stages, group * tp // bq)
    ops.check_smem(2 * head_dim * (2 * CONSUMERS * bk + 2 * stages * bq) + 8 * stages * bq,
                   f"{blocks} at head dim {head_dim}")
    dk, dv = ops.warp_specialized(
        *_dkdv_kernel(stages=stages, **static),
        out_type=[jax.ShapeDtypeStruct((batch, sp, kv_heads, head_dim), k.dtype),
                  jax.ShapeDtypeStruct((batch, sp, kv_heads, head_dim), v.dtype)],
        grid=(kv_heads, sp // (CONSUMERS * bk), batch), grid_names=("heads", "k_tile", "batch"), interpret=interpret,
    )(*args)
    return dq[:, :q_len], dk[:, :kv_len], dv[:, :kv_len]


def _dq_kernel(*, q_len, kv_len, group, head_dim, block_q, block_k, stages, causal, dtype):
    score_scale = head_dim ** -0.5 * LOG2E
    offset = kv_len - q_len  # key position of query 0

    def body(refs, row_smem, kv_smem, row_ready, kv_ready, kv_free):
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
        k_smem, v_smem = kv_smem
        k_ready, v_ready = kv_ready
        b, h, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
        cta_row = lax.axis_index("q_tile") * (CONSUMERS * block_q)
        # The last consumer's rows come last, so its block count bounds the CTA's.
        _, cta_steps = kv_block_range(cta_row + (CONSUMERS - 1) * block_q + offset, block_q, block_k,
                                      kv_len, causal)

        @pl.when(wg < CONSUMERS)
        def _consume():
            plgpu.set_max_registers(ops.CONSUMER_REGISTERS, action="increase")
            row = cta_row + wg * block_q
            first_pos = row + offset
            rows, row_values = (b, pl.ds(row, block_q), h), (b, h, pl.ds(row, block_q))
            sources = (q_ref.at[rows], do_ref.at[rows], lse_ref.at[row_values], delta_ref.at[row_values])
            q_tile, do_tile, lse_tile, delta_tile = tiles = [buffer.at[wg] for buffer in row_smem]
            for source, tile, ready in zip(sources, tiles, row_ready):
                plgpu.copy_gmem_to_smem(source, tile, ready.at[wg])
            for ready in row_ready:
                plgpu.barrier_wait(ready.at[wg])
            lse, delta = ops.load_vector(lse_tile, 1), ops.load_vector(delta_tile, 1)

            def step(j, dq, masked):
                slot = lax.rem(j, jnp.int32(stages))
                plgpu.barrier_wait(k_ready.at[slot])
                s = ops.matmul_nt(q_tile, k_smem.at[slot]) * score_scale
                p = jnp.exp2(s - lax.broadcast_in_dim(lse, s.shape, [0]))
                if masked:
                    p = jnp.where(ops.visible(s.shape, first_pos, j * block_k, kv_len, causal), p, 0.0)
                plgpu.barrier_wait(v_ready.at[slot])
                dp = ops.matmul_nt(do_tile, v_smem.at[slot])
                ds = p * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))
                dq = ops.matmul_acc(dq, ds.astype(dtype), k_smem.at[slot])
                plgpu.barrier_arrive(kv_free.at[slot])
                return dq

            def skip(j, dq):
                slot = lax.rem(j, jnp.int32(stages))
                plgpu.barrier_wait(k_ready.at[slot])
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_arrive(kv_free.at[slot])
                return dq

            n_full, n_end = kv_block_range(first_pos, block_q, block_k, kv_len, causal)
            dq = ops.in_wgmma_layout(jnp.zeros((block_q, head_dim), jnp.float32))
            dq = lax.fori_loop(0, n_full, lambda j, dq: step(j, dq, masked=False), dq)
            dq = lax.fori_loop(n_full, n_end, lambda j, dq: step(j, dq, masked=True), dq)
            dq = lax.fori_loop(n_end, cta_steps, skip, dq)
            q_tile[...] = (dq * head_dim ** -0.5).astype(dtype)  # the last wgmma reading Q is done
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_tile, dq_ref.at[rows])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == CONSUMERS)
        def _produce():
            load = ops.key_block_loader(k_ref, v_ref, kv_smem, kv_ready, b, lax.div(h, jnp.int32(group)), block_k)
            ops.produce_ring(cta_steps, stages, load, lambda slot: plgpu.barrier_wait(kv_free.at[slot]))

    row_tile = ops.tile_smem((CONSUMERS, block_q, head_dim), dtype)
    row_vector = plgpu.SMEM((CONSUMERS, block_q), jnp.float32)
    kv_ring = ops.tile_smem((stages, block_k, head_dim), dtype)
    scratch = ((row_tile, row_tile, row_vector, row_vector), (kv_ring, kv_ring),
               (plgpu.Barrier(num_barriers=CONSUMERS),) * 4, (plgpu.Barrier(num_barriers=stages),) * 2,
               plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages))
    return body, scratch


def _dkdv_kernel(*, q_len, kv_len, group, head_dim, block_q, block_k, stages, causal, dtype):
    score_scale = head_dim ** -0.5 * LOG2E
    offset = kv_len - q_len
    n_q = round_up(q_len, CONSUMERS * block_q) // block_q  # query blocks, as padded by the wrapper

    def body(refs, kv_smem, row_smem, kv_ready, row_ready, row_free):
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
        q_ring, do_ring, lse_ring, delta_ring = row_smem
        q_ready, do_ready, lse_ready, delta_ready = row_ready
        b, kv_head, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
        cta_key = lax.axis_index("k_tile") * (CONSUMERS * block_k)
        # The first consumer's keys come first, so it needs the most query blocks: [cta_lo, n_q)
        # of each query head of the group, streamed head after head.
        cta_lo, _ = q_block_range(cta_key, block_q, block_k, n_q, q_len, kv_len, causal)
        per_head = n_q - cta_lo

        @pl.when(wg < CONSUMERS)
        def _consume():
            plgpu.set_max_registers(ops.CONSUMER_REGISTERS, action="increase")
            start_k = cta_key + wg * block_k
            keys = (b, pl.ds(start_k, block_k), kv_head)
            k_tile, v_tile = tiles = [buffer.at[wg] for buffer in kv_smem]
            for source, tile, ready in zip((k_ref.at[keys], v_ref.at[keys]), tiles, kv_ready):
                plgpu.copy_gmem_to_smem(source, tile, ready.at[wg])
            for ready in kv_ready:
                plgpu.barrier_wait(ready.at[wg])

            def step(i, carry, g, masked):
                dk, dv = carry
                slot = lax.rem(g * per_head + i - cta_lo, jnp.int32(stages))
                q_tile, do_tile = q_ring.at[slot], do_ring.at[slot]
                plgpu.barrier_wait(q_ready.at[slot])
                plgpu.barrier_wait(lse_ready.at[slot])
                s_t = ops.matmul_nt(k_tile, q_tile) * score_scale
                lse = ops.load_vector(lse_ring.at[slot], 0)
                p_t = jnp.exp2(s_t - lax.broadcast_in_dim(lse, s_t.shape, [1]))
                if masked:
                    visible = ops.visible(s_t.shape, i * block_q + offset, start_k, kv_len, causal, keys_dim=0)
                    p_t = jnp.where(visible, p_t, 0.0)
                plgpu.barrier_wait(do_ready.at[slot])
                dv = ops.matmul_acc(dv, p_t.astype(dtype), do_tile)
                dp_t = ops.matmul_nt(v_tile, do_tile)
                plgpu.barrier_wait(delta_ready.at[slot])
                delta = ops.load_vector(delta_ring.at[slot], 0)
                ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta, dp_t.shape, [1]))
                dk = ops.matmul_acc(dk, ds_t.astype(dtype), q_tile)
                plgpu.barrier_arrive(row_free.at[slot])
                return dk, dv

            def skip(i, carry, g):
                slot = lax.rem(g * per_head + i - cta_lo, jnp.int32(stages))
                for ready in row_ready:
                    plgpu.barrier_wait(ready.at[slot])
                plgpu.barrier_arrive(row_free.at[slot])
                return carry

            lo, mid = q_block_range(start_k, block_q, block_k, n_q, q_len, kv_len, causal)

            def over_group(g, carry):
                carry = lax.fori_loop(cta_lo, lo, lambda i, c: skip(i, c, g), carry)
                carry = lax.fori_loop(lo, mid, lambda i, c: step(i, c, g, masked=True), carry)
                return lax.fori_loop(mid, n_q, lambda i, c: step(i, c, g, masked=False), carry)

            zeros = ops.in_wgmma_layout(jnp.zeros((block_k, head_dim), jnp.float32))
            dk, dv = lax.fori_loop(0, group, over_group, (zeros, zeros))
            k_tile[...] = (dk * head_dim ** -0.5).astype(dtype)  # the last wgmmas reading K, V are done
            v_tile[...] = dv.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_tile, dk_ref.at[keys])
            plgpu.copy_smem_to_gmem(v_tile, dv_ref.at[keys])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == CONSUMERS)
        def _produce():

            def load(t, slot):
                h = kv_head * group + lax.div(t, per_head)
                start = (cta_lo + lax.rem(t, per_head)) * block_q
                rows, row_values = (b, pl.ds(start, block_q), h), (b, h, pl.ds(start, block_q))
                sources = (q_ref.at[rows], do_ref.at[rows], lse_ref.at[row_values], delta_ref.at[row_values])
                for source, ring, ready in zip(sources, row_smem, row_ready):
                    plgpu.copy_gmem_to_smem(source, ring.at[slot], ready.at[slot])

            ops.produce_ring(group * per_head, stages, load, lambda slot: plgpu.barrier_wait(row_free.at[slot]))

    kv_tile = ops.tile_smem((CONSUMERS, block_k, head_dim), dtype)
    row_ring = ops.tile_smem((stages, block_q, head_dim), dtype)
    vector_ring = plgpu.SMEM((stages, block_q), jnp.float32)
    scratch = ((kv_tile, kv_tile), (row_ring, row_ring, vector_ring, vector_ring),
               (plgpu.Barrier(num_barriers=CONSUMERS),) * 2, (plgpu.Barrier(num_barriers=stages),) * 4,
               plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages))
    return body, scratch
