"""The CORE scorer's attention and rows (evals/shared_prefix.py) against float64 NumPy masks and
against whole rows in their own forward pass."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.base import base_config
from nanochat_jax import model as model_lib, sharding
from nanochat_jax.attention import block_causal, heads_first, tokens_first
from nanochat_jax.evals import shared_prefix
from nanochat_jax.model import GPTConfig

RULES = sharding.parse_rules(base_config(4).mesh.rules)


def ref_attention(q, k, v, visible):
    """float64 softmax attention (B, T, H, D) with GQA and a (B, T, S) boolean mask."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(visible[:, None], scores, -1e300)  # padding queries see nothing: no NaN
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", probs, v)


def qkv(batch, seq, heads=4, kv_heads=2, head_dim=8, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (batch, seq, heads, head_dim)),
            jax.random.normal(keys[1], (batch, seq, kv_heads, head_dim)),
            jax.random.normal(keys[2], (batch, seq, kv_heads, head_dim)))


@pytest.mark.parametrize("num_blocks", [1, 3, 8])
def test_block_causal_is_causal_attention(num_blocks):
    q, k, v = qkv(2, 24)
    causal = np.broadcast_to(np.tril(np.ones((24, 24), bool)), (2, 24, 24))
    out = tokens_first(block_causal(*heads_first(q, k, v), num_blocks), q.dtype)
    np.testing.assert_allclose(out, ref_attention(q, k, v, causal), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of 5 blocks"):
        block_causal(*heads_first(q, k, v), 5)


def test_shared_prefix_attention_sees_the_real_prefix_and_its_own_suffix():
    prefix_region, suffix_region = 64, 16
    prefix_lengths = np.array([40, 0, 64])  # padded prefix; no prefix at all; a full region
    segments = np.full((3, suffix_region), -1)
    segments[0, :9] = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    segments[1, :4] = [0, 0, 1, 1]
    segments[2, :16] = np.repeat([0, 1], 8)
    q, k, v = qkv(3, prefix_region + suffix_region, seed=1)
    out = np.asarray(shared_prefix.shared_prefix_attention(q, k, v, jnp.asarray(prefix_lengths),
                                                           jnp.asarray(segments)))
    assert np.isfinite(out).all()  # padding queries, which see nothing real, too
    length = prefix_region + suffix_region
    visible = np.zeros((3, length, length), bool)
    for b in range(3):
        visible[b, :prefix_region, :prefix_region] = np.tril(np.ones((prefix_region, prefix_region), bool))
        for i in range(suffix_region):
            if segments[b, i] >= 0:
                visible[b, prefix_region + i, :prefix_lengths[b]] = True
                mine = segments[b, :i + 1] == segments[b, i]
                visible[b, prefix_region + i, prefix_region:prefix_region + i + 1] = mine
    expected = ref_attention(q, k, v, visible)
    real = np.concatenate([np.ones((3, prefix_region), bool), segments >= 0], axis=1)
    np.testing.assert_allclose(out[real], expected[real], rtol=1e-5, atol=1e-5)


def test_shared_rows_score_like_whole_rows():
    """Per-token scores of [prefix | padding | suffix 1 | suffix 2] equal those of the two whole
    rows prefix + suffix, each run alone, on a model with grouped KV heads."""
    cfg = GPTConfig(vocab_size=64, n_layer=2, dim=32, n_head=4, n_kv_head=2, sequence_len=64, rope_base=100.0,
                    softcap=15.0, compute_dtype="float32", attention="xla")
    graphdef, state = nnx.split(model_lib.GPT(cfg, rngs=nnx.Rngs(0)))
    params = jax.tree.map(lambda x: jax.random.normal(jax.random.key(3), x.shape) * 0.3, state)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    static = {"graphdef": graphdef, "mesh": mesh, "rules": tuple(RULES.items())}
    rng = np.random.default_rng(0)
    prefix, suffixes = rng.integers(1, 64, 21).tolist(), [rng.integers(1, 64, 5).tolist(), rng.integers(1, 64, 3).tolist()]
    tokens = np.zeros((1, 64 + 16), np.int32)
    positions = np.zeros_like(tokens)
    positions[0, :64] = np.arange(64)
    segments = np.full((1, 16), -1, np.int32)
    tokens[0, :21] = prefix
    tokens[0, 64:69], tokens[0, 69:72] = suffixes
    positions[0, 64:69], positions[0, 69:72] = np.arange(21, 26), np.arange(21, 24)
    segments[0, :8] = [0] * 5 + [1] * 3
    losses, hits = shared_prefix.score_shared_rows(params, tokens, positions, np.array([21], np.int32), segments,
                                                   **static)
    for segment, (start, suffix) in enumerate([(0, suffixes[0]), (5, suffixes[1])]):
        whole = np.array([prefix + suffix], np.int32)
        whole_losses, whole_hits = shared_prefix.score_rows(params, whole, **static)
        n = len(suffix) - 1  # positions inside the suffix that predict a token of it
        np.testing.assert_allclose(losses[0, start:start + n], whole_losses[0, 21:21 + n], rtol=1e-5)
        np.testing.assert_array_equal(hits[0, start:start + n], whole_hits[0, 21:21 + n])
