"""Pure-JAX references for the kernels: dense fp32 scores, K/V repeated per query head.

Written the obvious way on purpose (no grouping, no blocking) so that they share no structure
with the kernels they check. Layout (batch, seq, heads, head_dim) throughout.
"""
import jax
import jax.numpy as jnp


def _attend(q, k, v, visible):
    """Softmax attention with a boolean `visible` (B, T, S) mask; rows that see nothing give 0."""
    heads, kv_heads = q.shape[2], k.shape[2]
    k = jnp.repeat(k, heads // kv_heads, axis=2)
    v = jnp.repeat(v, heads // kv_heads, axis=2)
    scores = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k.astype(jnp.float32))
    scores = jnp.where(visible[:, None], scores * q.shape[-1] ** -0.5, -jnp.inf)
    any_visible = jnp.any(visible, axis=-1)[:, None, :, None]
    probs = jnp.where(any_visible, jax.nn.softmax(jnp.where(any_visible, scores, 0.0), axis=-1), 0.0)
    out = jnp.einsum("bhts,bshd->bthd", probs, v.astype(jnp.float32))
    return out.astype(q.dtype)


def attention_reference(q, k, v, *, causal: bool = True):
    """Query i sits at key position i + (S - T), as in nanochat_jax.attention.xla_attention."""
    batch, q_len = q.shape[:2]
    kv_len = k.shape[1]
    visible = jnp.ones((q_len, kv_len), bool)
    if causal:
        visible = jnp.tril(visible, k=kv_len - q_len)
    return _attend(q, k, v, jnp.broadcast_to(visible, (batch, q_len, kv_len)))


def decode_reference(q, k_cache, v_cache, lengths):
    """The Tq queries of row b are the last Tq positions of its valid prefix: query t sits at
    position lengths[b] - Tq + t and sees cache positions 0 .. lengths[b] - Tq + t."""
    q_len, kv_len = q.shape[1], k_cache.shape[1]
    last = lengths[:, None] - q_len + jnp.arange(q_len)[None, :]           # (B, Tq)
    visible = jnp.arange(kv_len)[None, None, :] <= last[:, :, None]          # (B, Tq, S)
    return _attend(q, k_cache, v_cache, visible)
