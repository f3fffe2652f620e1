"""What the Hopper (Mosaic GPU) attention kernels share: tile sizes and shared-memory layout, the
kernel launch and the TMA producer loop, the register-level operations, masks and the online
softmax.

The register-level operations (wgmma from shared memory or registers, layout casts, iota,
row-vector loads) are kept here, apart from the kernels' protocol of copies and barriers, so
that tests/test_kernels_mgpu.py can swap them for jnp equivalents and run everything else in
jax's Mosaic GPU interpreter, which lacks them.
"""
import dataclasses

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.common import MASK_VALUE

CONSUMERS = 2            # compute warpgroups per CTA; a third one is the TMA producer
SMEM_BYTES = 227 * 1024  # shared memory one H100/H200 CTA may use
CONSUMER_REGISTERS, PRODUCER_REGISTERS = 232, 40  # 2 x 128 x 232 + 128 x 40 <= 64K registers


@dataclasses.dataclass(frozen=True)
class MgpuBlocks:
    """Tile sizes. Forward and dQ: `block_q` query rows per consumer warpgroup, `block_k` keys
    per pipeline step. dK/dV swaps the roles: `block_k` keys per consumer, `block_q` query rows
    per step. `stages`: pipeline steps in flight in the shared-memory ring."""
    block_q: int = 64    # wgmma's M is 64 per warpgroup
    block_k: int = 128
    stages: int = 2

    def __post_init__(self):
        if self.block_q % 64 or self.block_k % 64 or self.stages < 2:
            raise ValueError(f"block_q and block_k must be multiples of 64 and stages >= 2, got {self}")


def check_operands(q, k, v):
    """Raise ValueError unless q, k, v (..., D) are what the kernels' wgmma and TMA tiles take."""
    if not q.dtype == k.dtype == v.dtype or jnp.dtype(q.dtype).itemsize != 2:
        raise ValueError(f"the Mosaic GPU kernels take bf16/fp16 q, k, v, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] % 64 or q.shape[-1] > 256:
        raise ValueError(f"head dim {q.shape[-1]} is not a multiple of 64 up to 256")


def check_smem(nbytes: int, tiles: str):
    """Refuse tile sizes (described by `tiles`) whose buffers need more shared memory than a CTA has."""
    if nbytes > SMEM_BYTES:
        raise ValueError(f"{tiles} needs {nbytes} bytes of shared memory, more than Hopper's {SMEM_BYTES}; "
                         f"lower the block sizes or stages")


def tile_smem(shape, dtype):
    """A shared-memory buffer of (..., rows, cols) tiles laid out for TMA and wgmma: 128-byte
    swizzled rows of 8 x (128 bytes) tiles."""
    tiling = plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize))
    return plgpu.SMEM(shape, dtype, transforms=(tiling, plgpu.SwizzleTransform(128)))


def warp_specialized(body, scratch, *, out_type, grid, grid_names, interpret, consumers: int = CONSUMERS):
    """A kernel of `consumers` + 1 warpgroups (axis "wg") over `grid`: body(refs, *allocated) gets
    the input and output refs as one tuple and the `scratch` (shared memory, barriers) allocated
    once for the whole CTA. `interpret`: None to compile, or jax's interpreter parameters."""
    def entry(*refs):
        pl.run_scoped(lambda *allocated: body(refs, *allocated), *scratch, collective_axes="wg")
    return plgpu.kernel(entry, out_type=out_type, grid=grid, grid_names=grid_names, num_threads=consumers + 1,
                        thread_name="wg", compiler_params=plgpu.CompilerParams(approx_math=True),
                        interpret=interpret)


def key_block_loader(k_ref, v_ref, rings, ready, batch, kv_head, block_k: int, first_key=0):
    """load(step, slot) for produce_ring: TMA copies of keys first_key + step * block_k onwards of
    K and V (B, S, Hkv, D) into slot `slot` of `rings` (K's, V's), completing `ready` (K's, V's)."""
    def load(step, slot):
        keys = (batch, pl.ds(first_key + step * block_k, block_k), kv_head)
        for ref, ring, barrier in zip((k_ref, v_ref), rings, ready):
            plgpu.copy_gmem_to_smem(ref.at[keys], ring.at[slot], barrier.at[slot])
    return load


def produce_ring(n_steps, stages: int, load, wait_free):
    """The producer warpgroup's whole work: `load(step, slot)` issues the TMA copies of a step
    into ring slot step % stages once `wait_free(slot)` says the consumers are done with its
    last use. It ends by waiting for the last slots' release too, so that no barrier phase is
    left unobserved when the shared memory is released."""
    plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")  # issuing copies needs few
    for j in range(stages):  # fill the ring; a short tile may need fewer steps
        pl.when(jnp.asarray(n_steps) > j)(lambda j=j: load(j, j))

    @pl.loop(stages, n_steps)
    def _refill(j):
        slot = lax.rem(j, jnp.int32(stages))
        wait_free(slot)
        load(j, slot)

    @pl.loop(jnp.maximum(n_steps - stages, 0), n_steps)
    def _drain(j):
        wait_free(lax.rem(j, jnp.int32(stages)))


# ---- register-level operations (swapped for jnp in the interpreter tests) -------------------

def matmul_nt(a_tile, b_tile, then=None):
    """A B^T in fp32 from two shared-memory tiles (B transposed by the wgmma descriptor, not
    moved); `then` runs while the wgmma is in flight."""
    def issue(acc_ref):
        plgpu.wgmma(acc_ref, a_tile, plgpu.transpose_ref(b_tile, (1, 0)))
        if then is not None:
            then()
        return acc_ref[...]
    return pl.run_scoped(issue, plgpu.ACC((a_tile.shape[0], b_tile.shape[0]), jnp.float32))


def matmul_acc(acc, a, b_tile):
    """acc + A B: acc fp32 in registers (wgmma layout), A 16-bit in registers, B in shared memory."""
    def issue(acc_ref):
        plgpu.wgmma(acc_ref, a, b_tile)
    return pl.run_state(issue)(plgpu.ACC.init(acc))


def iota(shape, dim):
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def in_wgmma_layout(x):
    """A (rows, cols) array in wgmma's accumulator layout, a (rows,) one in its row layout."""
    return plgpu.layout_cast(x, plgpu.Layout.WGMMA if x.ndim == 2 else plgpu.Layout.WGMMA.reduce(1))


def load_vector(ref, along: int):
    """A (n,) shared-memory vector in the layout that broadcasts along dim `along` of a wgmma
    accumulator: along=1 gives one value per row, along=0 one per column."""
    return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(along))


# ---- masks and the online softmax, built on the operations above (run as they are in tests) --

def visible(shape, first_q, first_k, kv_len: int, causal: bool, keys_dim: int = 1):
    """Which entries of a (queries, keys) score tile attention sees, or of a (keys, queries) one
    with keys_dim=0: real keys (not padding), and with `causal` none from a query's future.
    first_q is the key position of the tile's first query, first_k that of its first key."""
    k_pos = first_k + iota(shape, keys_dim)
    mask = k_pos < kv_len
    return mask & (k_pos <= first_q + iota(shape, 1 - keys_dim)) if causal else mask


def softmax_block(s, visible, acc, m, l):
    """One key block of the online softmax, in registers: s base-2 scores (rows, keys), `visible`
    their mask or None; acc (rows, D), m and l (rows,) the running output, max and sum. Returns
    the block's unnormalised probabilities p (fp32; masked entries exactly 0, even in a row that
    has seen no visible key yet) and acc rescaled to the new max, m and l updated; the caller
    adds p V to acc."""
    if visible is not None:
        s = jnp.where(visible, s, MASK_VALUE)
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
    if visible is not None:
        p = jnp.where(visible, p, 0.0)
    return p, acc * lax.broadcast_in_dim(alpha, acc.shape, [0]), m_new, l * alpha + p.sum(axis=1)
