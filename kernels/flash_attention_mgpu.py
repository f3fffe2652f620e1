"""Causal flash attention forward for Hopper, written for Pallas' Mosaic GPU backend.

`mgpu_attention_forward(q, k, v)` returns what kernels/flash_attention.py's forward returns,
(out, lse): out (B, T, H, D) in q's dtype and the base-2 log-sum-exp (B, H, T) in fp32, so the
backward kernels there can consume it unchanged. q (B, T, H, D), k/v (B, S, Hkv, D) in bf16 or
fp16, H a multiple of Hkv (GQA/MQA without repeating K/V), D a multiple of 64 up to 256.

The shape is FlashAttention-3's. One CTA per (q head, 2 * block_q query rows, batch) runs
three warpgroups:
- a producer warpgroup that only issues TMA copies of K and V blocks into a ring of
  `stages` shared-memory slots, each slot guarded by a "ready" barrier (the TMA completes it)
  and a "free" barrier (both consumers arrive once they are done with the slot);
- two consumer warpgroups, each owning block_q query rows: S = Q K^T with wgmma from shared
  memory (K transposed for free by the descriptor), the online softmax in registers, then
  O += P V with P fed to wgmma straight from registers.
A two-arrival "schedule" barrier staggers the consumers by half a step (ping-pong), so that one
runs its softmax while the other's matmuls occupy the tensor cores.

Causal blocks past the diagonal are never loaded; blocks wholly below it run unmasked and only
the diagonal (and ragged-tail) blocks build a mask, the split kernels/common.kv_block_range
computes for the interpreted kernel too. Ragged T and S are padded up to block multiples in the
wrapper and masked in the kernel, as there. When one consumer needs fewer KV blocks than the
other (its rows end earlier), it still arrives on the free and schedule barriers of the blocks
it skips, so the producer and the ping-pong never wait on it.

Verified here (CPU, jax 0.10.2, tests/test_kernels_mgpu.py): the kernel lowers through Mosaic
GPU to sm_90a code (wgmma, TMA, mbarriers) at the d12/d20 shapes and at small ragged GQA/MQA
shapes, lowering for the "cuda" platform on a CPU-only machine; and jax's Mosaic GPU interpreter
runs its whole TMA/barrier protocol (ring refills, drain, ping-pong, skipped blocks, masks,
output and lse writes) against the reference, with the register-level operations of
kernels/mgpu_ops.py replaced by jnp equivalents because that interpreter lacks layout casts and
wgmma with transposed or register operands. Not verified: the compiled kernel's numbers and
speed (no GPU was available); a GPU test compares it with the reference and skips here. It is
reached through `model.attention=mosaic`, with the backward of
kernels/flash_attention_mgpu_bwd.py; `auto` keeps cuDNN until bench_attention has measured both
on an H100. Known hazard: jax's own Mosaic GPU attention refuses causal masking under CUDA
12.8.0 to 12.9.0 for a ptxas miscompilation; use a CUDA outside that range (the project's GPU
image has CUDA 13).
"""
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import mgpu_ops as ops
from kernels.common import LOG2E, MASK_VALUE, check_attention_inputs, kv_block_range, pad_axis, round_up
from kernels.mgpu_ops import CONSUMERS, MgpuBlocks


def check_supported(q, k, v, causal: bool):
    """Raise ValueError unless this kernel handles these inputs (the caller can fall back)."""
    check_attention_inputs(q, k, v, causal)
    ops.check_operands(q, k, v)


def mgpu_attention_forward(q, k, v, *, causal: bool = True, blocks: MgpuBlocks = MgpuBlocks(),
                           interpret=None):
    """(out, lse) as described in the module docstring. `interpret`: None to compile, or jax's
    Mosaic GPU interpreter parameters (tests only; see tests/test_kernels_mgpu.py)."""
    check_supported(q, k, v, causal)
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    bq, bk = blocks.block_q, blocks.block_k
    tp, sp = round_up(q_len, CONSUMERS * bq), round_up(kv_len, bk)
    stages = min(blocks.stages, sp // bk)
    ops.check_smem(2 * head_dim * (CONSUMERS * bq + 2 * stages * bk) + 4 * CONSUMERS * bq,
                   f"{blocks} at head dim {head_dim}")
    body, scratch = _forward_kernel(q_len=q_len, kv_len=kv_len, group=heads // kv_heads, head_dim=head_dim,
                                    block_q=bq, block_k=bk, stages=stages, causal=causal, dtype=q.dtype)
    out, lse = ops.warp_specialized(
        body, scratch,
        out_type=[jax.ShapeDtypeStruct((batch, tp, heads, head_dim), q.dtype),
                  jax.ShapeDtypeStruct((batch, heads, tp), jnp.float32)],
        grid=(heads, tp // (CONSUMERS * bq), batch), grid_names=("heads", "q_tile", "batch"), interpret=interpret,
    )(pad_axis(q, 1, tp), pad_axis(k, 1, sp), pad_axis(v, 1, sp))
    return out[:, :q_len], lse[:, :, :q_len]


def _forward_kernel(*, q_len, kv_len, group, head_dim, block_q, block_k, stages, causal, dtype):
    score_scale = head_dim ** -0.5 * LOG2E  # scores in base 2, as everywhere in kernels/
    offset = kv_len - q_len                 # key position of query 0
    rows_per_cta = CONSUMERS * block_q

    def body(refs, smem, ready, free, schedule):
        q_ref, k_ref, v_ref, o_ref, lse_ref = refs
        q_smem, k_smem, v_smem, lse_smem = smem
        q_ready, k_ready, v_ready = ready
        k_free, v_free = free
        b, h, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
        cta_row = lax.axis_index("q_tile") * rows_per_cta
        # The last consumer's rows come last, so its block count bounds the CTA's.
        _, cta_steps = kv_block_range(cta_row + (CONSUMERS - 1) * block_q + offset, block_q, block_k,
                                      kv_len, causal)

        def sync_schedule():
            plgpu.barrier_arrive(schedule)
            plgpu.barrier_wait(schedule)

        @pl.when(wg < CONSUMERS)
        def _consume():
            plgpu.set_max_registers(ops.CONSUMER_REGISTERS, action="increase")
            row = cta_row + wg * block_q
            first_pos = row + offset
            n_full, n_end = kv_block_range(first_pos, block_q, block_k, kv_len, causal)
            q_tile, lse_tile = q_smem.at[wg], lse_smem.at[wg]
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row, block_q), h], q_tile, q_ready.at[wg])
            plgpu.barrier_wait(q_ready.at[wg])

            def step(j, carry, masked):
                acc, m, l = carry
                slot = lax.rem(j, jnp.int32(stages))
                plgpu.barrier_wait(k_ready.at[slot])

                s = ops.matmul_nt(q_tile, k_smem.at[slot], then=sync_schedule) * score_scale
                plgpu.barrier_arrive(k_free.at[slot])
                visible = ops.visible(s.shape, first_pos, j * block_k, kv_len, causal) if masked else None
                p, acc, m, l = ops.softmax_block(s, visible, acc, m, l)
                p = p.astype(dtype)
                plgpu.barrier_arrive(schedule)  # softmax done: let the other consumer's matmuls go
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_wait(schedule)
                acc = ops.matmul_acc(acc, p, v_smem.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m, l

            def skip(j, carry):
                """A block only the other consumer needs: wait for it like the others (every
                thread that waits on a barrier sees each of its phases), release it at once and
                keep the ping-pong going."""
                slot = lax.rem(j, jnp.int32(stages))
                plgpu.barrier_wait(k_ready.at[slot])
                plgpu.barrier_arrive(k_free.at[slot])
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])
                sync_schedule()
                sync_schedule()
                return carry

            carry = (ops.in_wgmma_layout(jnp.zeros((block_q, head_dim), jnp.float32)),
                     ops.in_wgmma_layout(jnp.full((block_q,), MASK_VALUE, jnp.float32)),
                     ops.in_wgmma_layout(jnp.zeros((block_q,), jnp.float32)))
            pl.when(wg == 1)(sync_schedule)  # start half a step behind the first consumer
            carry = lax.fori_loop(0, n_full, lambda j, c: step(j, c, masked=False), carry)
            carry = lax.fori_loop(n_full, n_end, lambda j, c: step(j, c, masked=True), carry)
            acc, m, l = lax.fori_loop(n_end, cta_steps, skip, carry)
            pl.when(wg == 0)(sync_schedule)

            # Every real row sees key 0 (S >= T), so l >= 1; padding rows are sliced off.
            q_tile[...] = (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(dtype)
            lse_tile[...] = m + jnp.log2(l)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_tile, o_ref.at[b, pl.ds(row, block_q), h])
            plgpu.copy_smem_to_gmem(lse_tile, lse_ref.at[b, h, pl.ds(row, block_q)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == CONSUMERS)
        def _produce():
            load = ops.key_block_loader(k_ref, v_ref, (k_smem, v_smem), (k_ready, v_ready), b,
                                        lax.div(h, jnp.int32(group)), block_k)

            def wait_free(slot):
                plgpu.barrier_wait(k_free.at[slot])
                plgpu.barrier_wait(v_free.at[slot])

            ops.produce_ring(cta_steps, stages, load, wait_free)

    scratch = ((ops.tile_smem((CONSUMERS, block_q, head_dim), dtype), ops.tile_smem((stages, block_k, head_dim), dtype),
                ops.tile_smem((stages, block_k, head_dim), dtype), plgpu.SMEM((CONSUMERS, block_q), jnp.float32)),
               (plgpu.Barrier(num_barriers=CONSUMERS), plgpu.Barrier(num_barriers=stages),
                plgpu.Barrier(num_barriers=stages)),
               (plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),) * 2,
               plgpu.Barrier(num_arrivals=CONSUMERS))
    return body, scratch
