"""bf16 compute, which every accelerator run uses: the same fp32 parameters and batch give the fp32
loss and gradients within bf16 round-off, and KV-cache decoding in bf16 gives the bf16 forward's
logits. bf16 keeps 8 significant bits: one unit in the last place is 2^-8 relative."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanochat_jax import model as model_lib
from nanochat_jax.config import load_config

BF16_EPS = 2.0 ** -8
BATCH, SEQ, VOCAB = 2, 16, 256


def tiny_model(compute_dtype: str) -> model_lib.GPTConfig:
    c = load_config("tiny")
    c.model.depth = 2
    c.model.vocab_size = VOCAB
    c.model.sequence_len = SEQ
    c.model.compute_dtype = compute_dtype
    return model_lib.GPTConfig.from_config(c.model)


@pytest.fixture(scope="module")
def params():
    """Every weight random, including the zero-initialised projections and LM head: with those at
    zero the loss would be log(vocab) in any dtype."""
    fresh = model_lib.init_params(tiny_model("float32"), jax.random.key(0))
    leaves, treedef = jax.tree.flatten(fresh)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return treedef.unflatten([jax.random.normal(k, p.shape) / np.sqrt(p.shape[0]) for k, p in zip(keys, leaves)])


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(2), (BATCH, SEQ + 1), 0, VOCAB)


def loss_and_grads(compute_dtype, params, tokens):
    graphdef, _, _ = model_lib.abstract_model(tiny_model(compute_dtype))
    fn = jax.jit(jax.value_and_grad(lambda p: model_lib.loss_fn(graphdef, p, tokens[:, :-1], tokens[:, 1:])))
    return fn(params)


def test_bf16_loss_and_gradients_match_fp32(params, tokens):
    loss32, grads32 = loss_and_grads("float32", params, tokens)
    loss16, grads16 = loss_and_grads("bfloat16", params, tokens)
    assert float(loss16) != float(loss32)  # the matmuls did run in bf16
    assert abs(float(loss16) - float(loss32)) < 4 * BF16_EPS * float(loss32)
    for (path, g32), g16 in zip(jax.tree_util.tree_leaves_with_path(grads32), jax.tree.leaves(grads16)):
        assert g16.dtype == jnp.float32  # gradients of the fp32 master weights
        relative = float(jnp.linalg.norm(g16 - g32) / jnp.linalg.norm(g32))
        assert relative < 16 * BF16_EPS, f"{jax.tree_util.keystr(path)}: relative gradient error {relative:.3g}"


def test_bf16_kv_cache_decode_matches_bf16_forward(params, tokens):
    """A prefill of 8 tokens, then one token at a time, against one forward pass over all of them."""
    cfg = tiny_model("bfloat16")
    graphdef, _, _ = model_lib.abstract_model(cfg)
    inputs = tokens[:, :-1]
    full = jax.jit(lambda p, idx: model_lib.forward(graphdef, p, idx))(params, inputs)
    cache = model_lib.empty_cache(cfg, BATCH, SEQ)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(cache))
    decode = jax.jit(lambda p, idx, cache, positions: model_lib.decode(graphdef, p, idx, cache, positions))
    prefill = 8
    logits, cache = decode(params, inputs[:, :prefill], cache, jnp.broadcast_to(jnp.arange(prefill), (BATCH, prefill)))
    pieces = [logits]
    for t in range(prefill, SEQ):
        logits, cache = decode(params, inputs[:, t:t + 1], cache, jnp.full((BATCH, 1), t))
        pieces.append(logits)
    decoded = jnp.concatenate(pieces, axis=1)
    scale = float(jnp.max(jnp.abs(full)))
    np.testing.assert_allclose(np.asarray(decoded), np.asarray(full), rtol=0, atol=4 * BF16_EPS * scale)
