"""Pieces shared by the attention kernels: the online-softmax step, masks, padding, and how a
pallas_call is compiled (interpreted on CPU, Triton on GPU).

The kernel bodies only use `ref[...]` loads and stores, `lax.dot_general` with fp32
accumulation, `lax.fori_loop` and elementwise jnp, so the same body runs under
`interpret=True` on any platform and lowers with Pallas' Triton backend on GPU. It does not
lower with Mosaic GPU through `pl.pallas_call`: Mosaic GPU has no `dot_general` rule (matmuls
there are `plgpu.wgmma` on shared-memory refs inside a `plgpu.kernel`), so GPU compilation asks
for Triton explicitly. See `kernels/flash_attention.py` for what has been verified.
"""
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

LOG2E = math.log2(math.e)  # scores are kept in base 2 so the kernels use exp2 (cheaper on GPU)
MASK_VALUE = -1e30          # finite, so a fully masked row never computes inf - inf
MIN_BLOCK = 16              # smallest matmul tile Triton accepts on tensor cores


def check_attention_inputs(q, k, v, causal: bool):
    """Raise ValueError unless q is (B, T, H, D) and k, v (B, S, Hkv, D) with Hkv dividing H and,
    with `causal`, S >= T (every query then sees at least key 0)."""
    if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"expected q (B, T, H, D) and k, v (B, S, Hkv, D); got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} KV heads")
    if causal and k.shape[1] < q.shape[1]:
        raise ValueError(f"causal attention needs at least as many keys ({k.shape[1]}) as queries ({q.shape[1]})")


def default_interpret() -> bool:
    """Pallas kernels compile only for GPU/TPU; everywhere else they run interpreted."""
    return jax.default_backend() == "cpu"


def compiler_params(interpret: bool, *, num_warps: int, num_stages: int = 2):
    """None when interpreting; Triton's parameters otherwise (see the module docstring)."""
    return None if interpret else pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def block_size(requested: int, length: int) -> int:
    """`requested`, shrunk for short sequences to the power of two that covers `length`."""
    return min(requested, max(MIN_BLOCK, pl.next_power_of_2(length)))


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_axis(x, axis: int, size: int, value=0):
    """Pad `x` with `value` along `axis` up to `size` (a no-op, hence free, when already there)."""
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def cdiv(a, b: int):
    """Ceiling division of a non-negative traced int by a static int (lax.div truncates)."""
    return lax.div(a + b - 1, b)


def kv_block_range(first_pos, block_q: int, block_k: int, kv_len: int, causal: bool):
    """KV blocks a query block must visit, split as [0, n_full) unmasked and [n_full, n_end)
    masked. first_pos is the key position of the block's first query. With `causal` and a real
    first query (first_pos < kv_len) no unmasked block holds padded keys; a block of padding
    queries past the end still gets a valid (clamped) range, whose output the caller drops."""
    n_blocks = -(-kv_len // block_k)
    if not causal:
        return kv_len // block_k, n_blocks
    n_end = jnp.minimum(cdiv(first_pos + block_q, block_k), n_blocks)
    return jnp.minimum(lax.div(first_pos + 1, block_k), n_end), n_end


def q_block_range(start_k, block_q: int, block_k: int, n_q: int, q_len: int, kv_len: int, causal: bool):
    """Query blocks that see KV block [start_k, start_k + block_k), split as [lo, mid) masked and
    [mid, n_q) unmasked (the transpose of kv_block_range), with lo <= mid <= n_q. Padded keys
    need no mask here: their dK and dV rows are sliced off, and no other output depends on them."""
    if not causal:
        return 0, 0
    offset = kv_len - q_len
    lo = jnp.minimum(lax.div(jnp.maximum(start_k - offset, 0), block_q), n_q)
    mid = cdiv(jnp.maximum(start_k + block_k - 1 - offset, 0), block_q)
    return lo, jnp.clip(mid, lo, n_q)


def dot(a, b, contract=(1, 0)):
    """2-D matmul contracting a's dim contract[0] with b's dim contract[1], accumulated in fp32."""
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                           preferred_element_type=jnp.float32)


def online_softmax_step(carry, s, v, mask=None):
    """One key block of the FlashAttention-2 forward recurrence.

    carry = (acc, m, l): unnormalised output (rows, D), running max and running sum (rows,),
    all fp32; s: base-2 scores (rows, block_k); v: (block_k, D). Masked entries get exactly zero
    weight (not exp(MASK - MASK) = 1 while a row has seen no visible key yet)."""
    acc, m, l = carry
    if mask is not None:
        s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    l = alpha * l + jnp.sum(p, axis=1)
    acc = alpha[:, None] * acc + dot(p.astype(v.dtype), v)
    return acc, m_new, l


def init_softmax_carry(rows: int, head_dim: int):
    return (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), MASK_VALUE, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
