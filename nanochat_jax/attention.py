"""Causal self-attention with interchangeable backends.

`xla` is the reference: plain einsums and a causal mask, GQA by grouping query heads over each
KV head (K/V are never repeated). `cudnn` is jax.nn.dot_product_attention's fused cuDNN kernel
with `is_causal` (no dense mask is built). `pallas` is this repo's FlashAttention-2 kernel
(kernels/flash_attention.py, forward and backward, GQA without repeating K/V); it runs
interpreted, hence slowly, on CPU. `mosaic` (Hopper only) swaps in the kernels written for
Mosaic GPU: the FlashAttention-3 style forward of kernels/flash_attention_mgpu.py and the
backward of kernels/flash_attention_mgpu_bwd.py. Neither has been timed on a GPU yet, so `auto`
still picks cuDNN on GPU for 16-bit inputs and the reference elsewhere.
Layout throughout: (batch, seq, heads, head_dim), except for `block_causal` and `masked_mix`,
which work heads-first for the CORE scorer's shared-prefix rows (evals/shared_prefix.py).

A pallas_call has no SPMD partitioning rule, so under a mesh XLA would gather q, k and v whole
onto every device and run the kernel replicated. Inside `sharding.activation_rules` the kernel
therefore runs per shard under shard_map instead: batch split over the batch axes and heads over
the tensor axis (when query and KV heads both split evenly; otherwise heads stay whole).

The kernel modules (and Pallas with them) are imported where a kernel backend runs, not with this
module: a model on the xla or cudnn backend never loads them.
"""
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from nanochat_jax import sharding

ATTENTION_AXES = ("batch", None, "act_heads", None)  # the sequence is never split for the kernel

BACKENDS = ("auto", "xla", "cudnn", "pallas", "mosaic")
# Query rows per KV head up to which cached attention uses a decode kernel: what the Mosaic GPU one
# takes (kernels/decode_attention_mgpu.ROWS, one wgmma tile); beyond it (long prefill chunks) the
# einsum version does better anyway.
DECODE_KERNEL_ROWS = 64


def resolve_backend(name: str, dtype) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {BACKENDS}")
    if name == "mosaic" and jax.default_backend() != "gpu":
        raise ValueError("attention backend 'mosaic' compiles for Hopper GPUs only; use pallas or xla here")
    if name != "auto":
        return name
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and jnp.dtype(dtype).itemsize == 2 else "xla"


def xla_attention(q, k, v, *, causal: bool = True):
    """Reference attention. With causal, query i sits at key position i + (S - T)."""
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} KV heads")
    q = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * head_dim ** -0.5
    if causal:
        visible = jnp.tril(jnp.ones((q_len, kv_len), bool), k=kv_len - q_len)
        scores = jnp.where(visible, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(batch, q_len, heads, head_dim).astype(q.dtype)


MASKED = -1e30  # finite: a query that sees no key (padding) averages all values instead of making NaN


def heads_first(q, k, v):
    """(B, T, H, D) q, k, v as (B, Hkv, G, T, D) queries (scaled) and (B, Hkv, S, D) keys, values."""
    batch, seq, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(batch, seq, kv_heads, heads // kv_heads, head_dim).transpose(0, 2, 3, 1, 4)
    return q * head_dim ** -0.5, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def masked_mix(q, k, v, bias):
    """softmax(q k^T + bias) v in the heads-first layout, fp32: (B, Hkv, G, T, D). The normaliser
    divides the (T, D) output rather than the (T, S) probabilities."""
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) + bias
    scores = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    out = jnp.einsum("bkgts,bksd->bkgtd", scores.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out / jnp.sum(scores, axis=-1, keepdims=True)


def tokens_first(out, dtype):
    """(B, Hkv, G, T, D) back to (B, T, H, D)."""
    batch, kv_heads, groups, seq, head_dim = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, seq, kv_heads * groups, head_dim).astype(dtype)


def block_causal(q, k, v, num_blocks: int):
    """Causal attention in the heads-first layout that skips the masked upper triangle: the queries
    of block i attend to the keys of blocks 0..i only, (1 + 1/num_blocks)/2 of the dense scores.
    On CPU, where writing the score matrix dominates, about 3x faster than `xla_attention` at
    T = 2048 with 8 blocks (4 heads of 64). T must be a multiple of num_blocks."""
    seq = q.shape[3]
    if seq % num_blocks:
        raise ValueError(f"sequence length {seq} is not a multiple of {num_blocks} blocks")
    size = seq // num_blocks
    diagonal = jnp.where(jnp.tril(jnp.ones((size, size), bool)), 0.0, MASKED)
    outs = []
    for i in range(num_blocks):
        end = (i + 1) * size
        bias = jnp.concatenate([jnp.zeros((size, end - size)), diagonal], axis=1)
        outs.append(masked_mix(q[..., end - size:end, :], k[:, :, :end], v[:, :, :end], bias))
    return jnp.concatenate(outs, axis=3)


def cached_attention(q, k_cache, v_cache, positions, *, backend: str = "xla", kv_len: int | None = None):
    """Queries (B, T, H, D) at absolute `positions` (B, T) against a KV cache (B, S, Hkv, D): each
    query sees the cached keys at positions up to its own (later slots hold stale or no data).
    The `xla` version reads only the first `kv_len` slots (a static bound above every position;
    None: all S), so a large preallocated cache costs nothing until it is filled. With a kernel
    backend (pallas, mosaic) and at most DECODE_KERNEL_ROWS query rows per KV head (a decode step,
    a short prefill chunk), kernels/decode_attention.py (or its Mosaic GPU version) runs instead:
    it skips each row's blocks past its own length, so it takes the whole cache (a slice would be
    a copy), and it takes each row's T positions to be consecutive, as the engine's always are."""
    if backend in ("pallas", "mosaic") and q.shape[1] * (q.shape[2] // k_cache.shape[2]) <= DECODE_KERNEL_ROWS:
        if backend == "mosaic":
            from kernels.decode_attention_mgpu import mgpu_decode_attention as kernel
        else:
            from kernels.decode_attention import decode_attention as kernel
        return kernel(q, k_cache, v_cache, positions[:, -1] + 1)
    if kv_len is not None:
        k_cache, v_cache = k_cache[:, :kv_len], v_cache[:, :kv_len]
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    q = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k_cache, preferred_element_type=jnp.float32) * head_dim ** -0.5
    visible = jnp.arange(k_cache.shape[1])[None, None, :] <= positions[:, :, None]  # (B, T, S)
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v_cache, preferred_element_type=jnp.float32)
    return out.reshape(batch, q_len, heads, head_dim).astype(q.dtype)


def attention(q, k, v, *, backend: str = "xla", causal: bool = True):
    if backend == "xla":
        return xla_attention(q, k, v, causal=causal)
    if backend == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
    if backend in ("pallas", "mosaic"):
        from kernels.flash_attention import flash_attention
        mosaic = backend == "mosaic"
        return per_shard(lambda q, k, v: flash_attention(q, k, v, causal=causal, mosaic=mosaic), q, k, v)
    raise ValueError(f"attention backend {backend!r} must be resolved first (see resolve_backend)")


def per_shard(kernel, q, k, v):
    """Run `kernel(q, k, v)` on each device's shard of the active mesh (see the module docstring)."""
    active = sharding.active_rules()
    if active is None:
        return kernel(q, k, v)
    mesh, rules = active
    q_spec = sharding.logical_to_spec(ATTENTION_AXES, q.shape, mesh, rules)
    kv_spec = sharding.logical_to_spec(ATTENTION_AXES, k.shape, mesh, rules)
    if q_spec[2] != kv_spec[2]:  # heads split for q but not for k/v: the group map would break
        q_spec, kv_spec = P(q_spec[0], None, None, None), P(kv_spec[0], None, None, None)
    if q_spec[0] != kv_spec[0]:
        raise ValueError(f"q and k/v batch dims shard differently: {q_spec} vs {kv_spec}")
    return jax.shard_map(kernel, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
                         check_vma=False)(q, k, v)
