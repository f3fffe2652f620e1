"""Scoring several continuations of one prefix in a single row: [prefix | suffix 1 | suffix 2 | ...].

A CORE example's options (or a prompt's answers) share most of their tokens. Its row holds the
shared prefix once, padded to a prefix region of P tokens, then each option's remaining tokens one
after another in a suffix region of S tokens. Attention makes the row behave like the separate
rows it stands for: the prefix region is causal, and a suffix token sees the real prefix (not its
padding) and the earlier tokens of its own suffix only; rotary positions continue each suffix from
the prefix's length. Logits are computed for the suffix region alone, where every scored position
lies. Against whole rows each in their own pass this runs the prefix once instead of once per
option, skips the masked upper triangle of the prefix's attention (block_causal), and drops the
vocabulary projection of every prefix position.
"""
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from nanochat_jax import sharding
from nanochat_jax.attention import MASKED, block_causal, heads_first, masked_mix, tokens_first

BLOCK = 64  # prefix regions are multiples of it; attention blocks are at least this long
MAX_BLOCKS = 8  # at most 1/16 of the dense scores wasted on the diagonal blocks' masked halves


def attention_blocks(prefix_region: int) -> int:
    """How many causal blocks the prefix region's attention runs in."""
    return max(1, min(MAX_BLOCKS, prefix_region // BLOCK))


def shared_prefix_attention(q, k, v, prefix_lengths, segments):
    """Attention for rows (B, P + S, H, D) laid out as above. prefix_lengths (B,): the real prefix
    of each row; segments (B, S): which suffix each suffix-region token belongs to (0, 1, ...; -1
    for padding, which sees only padding)."""
    batch, suffix_len = segments.shape
    prefix_len = q.shape[1] - suffix_len
    q, k, v = heads_first(q, k, v)
    prefix = block_causal(q[..., :prefix_len, :], k[:, :, :prefix_len], v[:, :, :prefix_len],
                          attention_blocks(prefix_len))
    key = jnp.arange(prefix_len + suffix_len)
    key_segment = jnp.concatenate([jnp.full((batch, prefix_len), -2, segments.dtype), segments], axis=1)
    query = prefix_len + jnp.arange(suffix_len)
    sees = ((key[None, None, :] < prefix_lengths[:, None, None])
            | ((key_segment[:, None, :] == segments[:, :, None]) & (key[None, None, :] <= query[None, :, None])))
    suffix = masked_mix(q[..., prefix_len:, :], k, v, jnp.where(sees, 0.0, MASKED)[:, None, None])
    return tokens_first(jnp.concatenate([prefix, suffix], axis=3), q.dtype)


def next_token_scores(logits, tokens):
    """Per position t: the loss of token t + 1 and whether the argmax predicts it, (B, T) each.
    The last position's wraps around to the row's first token and must not be scored."""
    targets = jnp.roll(tokens, -1, axis=1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked, jnp.argmax(logits, axis=-1) == targets


def replicated(mesh, *arrays):
    """The scores replicated, so that every process can read them."""
    return tuple(jax.lax.with_sharding_constraint(a, NamedSharding(mesh, P())) for a in arrays)


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh", "rules"))
def score_rows(params, tokens, *, graphdef, mesh, rules):
    """next_token_scores of whole rows (R, L), one forward each (nanochat's way), replicated.
    `rules` is a hashable tuple of (name, axes) pairs; being static, evaluators of one model share
    compilations."""
    with sharding.activation_rules(mesh, dict(rules)):
        logits = nnx.merge(graphdef, params)(tokens)
    return replicated(mesh, *next_token_scores(logits, tokens))


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh", "rules"))
def score_shared_rows(params, tokens, positions, prefix_lengths, segments, *, graphdef, mesh, rules):
    """next_token_scores of the suffix regions (B, S) of rows (B, P + S) laid out as above, with
    per-token rotary `positions` (B, P + S), replicated."""
    with sharding.activation_rules(mesh, dict(rules)):
        model = nnx.merge(graphdef, params)
        attend = functools.partial(shared_prefix_attention, prefix_lengths=prefix_lengths, segments=segments)
        suffix_len = segments.shape[1]
        logits = model.logits(model.hidden(tokens, positions, attend=attend)[:, -suffix_len:])
    return replicated(mesh, *next_token_scores(logits, tokens[:, -suffix_len:]))
