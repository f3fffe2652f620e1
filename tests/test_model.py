"""The GPT against an independent float64 NumPy reference written from the architecture spec.

The reference below shares no code with `nanochat_jax`, so a wrong rotary, QK-norm, GQA head
mapping, softcap or loss mask in the model shows up as a mismatch. Parameters are replaced by
random values because `init_params` zeroes lm_head and every c_proj, which would hide most of
the network from a comparison. Gradient tests use one layer to keep XLA compiles short.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanochat_jax import model as model_lib
from nanochat_jax.config import load_config
from nanochat_jax.model import (GPTConfig, abstract_model, flops_per_token, forward, init_params,
                                loss_fn, num_params)

TINY = GPTConfig(vocab_size=23, n_layer=2, dim=16, n_head=4, n_kv_head=2, sequence_len=8,
                 rope_base=100.0, softcap=5.0, compute_dtype="float32", attention="xla")
GRAD = dataclasses.replace(TINY, n_layer=1)


# ---- NumPy float64 reference -------------------------------------------------------------------

def ref_rmsnorm(x):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def ref_rotary(x, base):
    """Half-split rotary on (B, T, H, D) at positions 0..T-1."""
    d = x.shape[-1]
    inv_freq = base ** (-np.arange(0, d, 2) / d)
    angle = np.arange(x.shape[1])[:, None] * inv_freq[None, :]
    cos, sin = np.cos(angle)[None, :, None, :], np.sin(angle)[None, :, None, :]
    x1, x2 = x[..., :d // 2], x[..., d // 2:]
    return np.concatenate([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], axis=-1)


def ref_attn(x, p, cfg):
    b, t, _ = x.shape
    h, hkv = cfg.n_head, cfg.n_kv_head
    d = cfg.dim // h
    q = (x @ p["c_q"]["kernel"]).reshape(b, t, h, d)
    k = (x @ p["c_k"]["kernel"]).reshape(b, t, hkv, d)
    v = (x @ p["c_v"]["kernel"]).reshape(b, t, hkv, d)
    q = ref_rmsnorm(ref_rotary(q, cfg.rope_base))
    k = ref_rmsnorm(ref_rotary(k, cfg.rope_base))
    future = np.triu(np.ones((t, t), bool), k=1)
    out = np.empty_like(q)
    for head in range(h):
        kv = head // (h // hkv)
        scores = np.einsum("btd,bsd->bts", q[:, :, head], k[:, :, kv]) / np.sqrt(d)
        scores = np.where(future, -np.inf, scores)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out[:, :, head] = probs @ v[:, :, kv]
    return out.reshape(b, t, h * d) @ p["c_proj"]["kernel"]


def ref_mlp(x, p):
    return np.maximum(x @ p["c_fc"]["kernel"], 0.0) ** 2 @ p["c_proj"]["kernel"]


def ref_logits(params, idx, cfg):
    x = ref_rmsnorm(params["wte"][idx])
    for i in range(cfg.n_layer):
        block = params["blocks"][i]
        x = x + ref_attn(ref_rmsnorm(x), block["attn"], cfg)
        x = x + ref_mlp(ref_rmsnorm(x), block["mlp"])
    logits = ref_rmsnorm(x) @ params["lm_head"]["kernel"]
    return cfg.softcap * np.tanh(logits / cfg.softcap)


def ref_loss(params, idx, targets, cfg):
    logits = ref_logits(params, idx, cfg)
    top = logits.max(-1, keepdims=True)
    lse = (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))[..., 0]
    picked = np.take_along_axis(logits, np.maximum(targets, 0)[..., None], axis=-1)[..., 0]
    keep = targets >= 0
    return float(np.sum(np.where(keep, lse - picked, 0.0)) / max(keep.sum(), 1))


# ---- helpers -----------------------------------------------------------------------------------

def random_params(cfg, seed=0):
    """Every parameter random and non-zero: wte ~ N(0, 1), kernels ~ N(0, 0.7^2 / fan_in), and
    lm_head ~ N(0, 4^2 / dim) so that the logits reach well into the softcap's bend."""
    leaves, treedef = jax.tree.flatten_with_path(abstract_model(cfg)[1])
    rng = np.random.default_rng(seed)
    out = []
    for path, leaf in leaves:
        name = path[0].key
        if name == "wte":
            scale = 1.0
        else:
            scale = (4.0 if name == "lm_head" else 0.7) / math.sqrt(leaf.shape[0])
        out.append(jnp.asarray(scale * rng.standard_normal(leaf.shape), jnp.float32))
    return jax.tree.unflatten(treedef, out)


def to_f64(params):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), params)


def tokens(cfg, batch=2, seed=1):
    """Random inputs and targets, a few targets ignored (-1)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, cfg.vocab_size, (batch, cfg.sequence_len))
    targets = rng.integers(0, cfg.vocab_size, (batch, cfg.sequence_len))
    targets[0, 1] = targets[1, 3] = targets[1, -1] = -1
    return idx, targets


def jitted_forward(cfg):
    graphdef = abstract_model(cfg)[0]
    return jax.jit(lambda p, x: forward(graphdef, p, x))


def token_losses_and_grads(cfg, params, idx, targets):
    """Per-token losses, and the mean loss with its gradient, each from one jitted call."""
    graphdef = abstract_model(cfg)[0]
    per_token = jax.jit(lambda p: nnx.merge(graphdef, p).token_losses(idx, targets))(params)
    loss, grads = jax.jit(jax.value_and_grad(lambda p: loss_fn(graphdef, p, idx, targets)))(params)
    return per_token, loss, grads


def assert_trees_close(a, b, rtol, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def grad_case():
    """GRAD's random params and tokens with per-token losses, loss and gradients (no chunk, no remat)."""
    params = random_params(GRAD)
    idx, targets = tokens(GRAD)
    return params, idx, targets, token_losses_and_grads(GRAD, params, idx, targets)


# ---- tests -------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_logits_match_reference(n_kv_head):
    """MHA, GQA and MQA logits agree with the reference, with the softcap visibly bending them."""
    cfg = dataclasses.replace(TINY, n_kv_head=n_kv_head, softcap=2.0)
    params = random_params(cfg)
    idx, _ = tokens(cfg)
    logits = np.asarray(jitted_forward(cfg)(params, idx))
    expected = ref_logits(to_f64(params), idx, cfg)
    assert logits.dtype == np.float32 and logits.shape == (2, cfg.sequence_len, cfg.vocab_size)
    assert np.mean(np.abs(expected) > 0.5 * cfg.softcap) > 0.1, "softcap would not be exercised"
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_loss_matches_reference_and_ignores_negative_targets():
    """Mean CE over kept targets equals the reference; all-ignored targets give exactly 0."""
    params = random_params(TINY)
    idx, targets = tokens(TINY)
    graphdef = abstract_model(TINY)[0]
    loss = jax.jit(lambda p, x, y: loss_fn(graphdef, p, x, y))
    np.testing.assert_allclose(float(loss(params, idx, targets)),
                               ref_loss(to_f64(params), idx, targets, TINY), rtol=1e-5)
    assert float(loss(params, idx, np.full_like(targets, -1))) == 0.0


@pytest.mark.parametrize("chunk", [3, 4], ids=["ragged", "dividing"])
def test_chunked_loss_matches_unchunked(grad_case, chunk):
    """Chunking the loss (including a ragged last chunk) changes neither losses nor gradients."""
    params, idx, targets, (per_token0, loss0, grads0) = grad_case
    per_token1, loss1, grads1 = token_losses_and_grads(
        dataclasses.replace(GRAD, loss_chunk=chunk), params, idx, targets)
    assert np.all(np.asarray(per_token1)[targets < 0] == 0.0)
    np.testing.assert_allclose(per_token1, per_token0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    assert_trees_close(grads1, grads0, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("remat", ["dots", "full"])
def test_remat_keeps_gradients(grad_case, remat):
    """Rematerialisation is a memory trade only: gradients equal those without it."""
    params, idx, targets, (_, loss0, grads0) = grad_case
    _, loss1, grads1 = token_losses_and_grads(dataclasses.replace(GRAD, remat=remat), params, idx, targets)
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    assert_trees_close(grads1, grads0, rtol=1e-4, atol=1e-6)


def test_gradient_matches_finite_difference_of_reference(grad_case):
    """For every parameter, jax's gradient along a random direction equals a central finite
    difference of the float64 reference loss. The error is measured against the gradient's
    norm, the typical size of a derivative along an N(0, 1) direction, so that an unluckily
    small projection cannot make the check flaky."""
    params, idx, targets, (_, _, grads) = grad_case
    ref_params = to_f64(params)
    rng = np.random.default_rng(2)
    eps = 1e-5
    for path, grad in jax.tree.flatten_with_path(grads)[0]:
        *parents, last = [key.key for key in path]
        holder = ref_params
        for key in parents:
            holder = holder[key]
        leaf = holder[last]
        direction = rng.standard_normal(leaf.shape)
        holder[last] = leaf + eps * direction
        plus = ref_loss(ref_params, idx, targets, GRAD)
        holder[last] = leaf - eps * direction
        minus = ref_loss(ref_params, idx, targets, GRAD)
        holder[last] = leaf
        finite_difference = (plus - minus) / (2 * eps)
        grad = np.asarray(grad, np.float64)
        analytic = float(np.sum(grad * direction))
        assert abs(analytic - finite_difference) <= 1e-3 * np.linalg.norm(grad), (
            jax.tree_util.keystr(path), analytic, finite_difference)


def test_causality():
    """Changing token t leaves every logit before t unchanged (and does change position t)."""
    params = random_params(TINY)
    idx, _ = tokens(TINY)
    run = jitted_forward(TINY)
    t = 5
    changed = idx.copy()
    changed[:, t] = (changed[:, t] + 1) % TINY.vocab_size
    before, after = np.asarray(run(params, idx)), np.asarray(run(params, changed))
    np.testing.assert_array_equal(after[:, :t], before[:, :t])
    assert np.abs(after[:, t] - before[:, t]).max() > 1e-3


def test_init():
    """nanochat's init: zero output projections and LM head, fan-in-scaled Gaussians elsewhere."""
    cfg = GPTConfig(vocab_size=64, n_layer=2, dim=128, n_head=2, n_kv_head=2)
    params = init_params(cfg, jax.random.key(0))
    assert not np.any(np.asarray(params["lm_head"]["kernel"]))
    for block in params["blocks"].values():
        assert not np.any(np.asarray(block["attn"]["c_proj"]["kernel"]))
        assert not np.any(np.asarray(block["mlp"]["c_proj"]["kernel"]))
        for kernel in (block["attn"]["c_q"]["kernel"], block["mlp"]["c_fc"]["kernel"]):
            np.testing.assert_allclose(np.std(np.asarray(kernel)), cfg.dim ** -0.5, rtol=0.05)
    np.testing.assert_allclose(np.std(np.asarray(params["wte"])), 1.0, rtol=0.05)


def test_d20_param_and_flop_counts():
    """The d20 sizes from nanochat, counted from shapes alone (no weights are allocated)."""
    cfg = GPTConfig.from_config(load_config("d20").model)
    vocab, dim, layers = 65536, 1280, 20
    assert (cfg.vocab_size, cfg.dim, cfg.n_layer, cfg.n_head, cfg.head_dim) == (vocab, dim, layers, 10, 128)
    assert num_params(cfg) == 2 * vocab * dim + layers * 12 * dim * dim == 560_988_160
    attention = 12 * layers * cfg.n_head * cfg.head_dim * cfg.sequence_len
    assert flops_per_token(cfg) == 6 * (560_988_160 - vocab * dim) + attention == 3_491_758_080


@pytest.mark.parametrize("attention", ["xla", "pallas"])
def test_kv_cache_decode_matches_full_forward(attention):
    """Prefill then one token at a time through the KV cache equals the full causal forward pass,
    also with rows at different positions (a right-padded prefill). With `pallas`, the cached
    steps run kernels/decode_attention.py (interpreted here)."""
    cfg = model_lib.GPTConfig(vocab_size=64, n_layer=2, dim=32, n_head=4, n_kv_head=2, sequence_len=32,
                              attention=attention)
    graphdef, _, _ = model_lib.abstract_model(cfg)
    params = jax.tree.map(lambda x: jax.random.normal(jax.random.key(x.size), x.shape) * 0.3,
                          model_lib.init_params(cfg, jax.random.key(0)))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 64)
    full = model_lib.forward(graphdef, params, tokens)
    cache = model_lib.empty_cache(cfg, 2, 16)
    logits, cache = model_lib.decode(graphdef, params, tokens[:, :7], cache, jnp.broadcast_to(jnp.arange(7), (2, 7)))
    steps = [logits]
    for t in range(7, 12):
        logits, cache = model_lib.decode(graphdef, params, tokens[:, t:t + 1], cache, jnp.full((2, 1), t))
        steps.append(logits)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, 1)), np.asarray(full), atol=1e-5)
    # row 1 restarts at position 3 (its earlier slots hold stale values beyond it): still exact
    positions = jnp.array([[9], [3]])
    logits, _ = model_lib.decode(graphdef, params, tokens[:, 3:4], cache, positions)
    np.testing.assert_allclose(np.asarray(logits[1, 0]), np.asarray(full[1, 3]), atol=1e-5)


def test_decode_reads_only_the_first_kv_len_slots():
    """With `kv_len`, attention never reads the slots past it: NaN there leaves the logits equal to
    the full forward pass's, while reading the whole cache spreads it (0 x NaN is NaN)."""
    cfg = model_lib.GPTConfig(vocab_size=64, n_layer=2, dim=32, n_head=4, n_kv_head=2, sequence_len=32)
    graphdef, _, _ = model_lib.abstract_model(cfg)
    params = random_params(cfg)
    tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, 64)
    full = model_lib.forward(graphdef, params, tokens)
    _, cache = model_lib.decode(graphdef, params, tokens[:, :5], model_lib.empty_cache(cfg, 2, 32),
                                jnp.broadcast_to(jnp.arange(5), (2, 5)))
    cache = jax.tree.map(lambda x: x.at[:, 8:].set(jnp.nan), cache)
    step = lambda kv_len: model_lib.decode(graphdef, params, tokens[:, 5:], cache, jnp.full((2, 1), 5), kv_len=kv_len)
    logits, new_cache = step(8)
    np.testing.assert_allclose(np.asarray(logits[:, 0]), np.asarray(full[:, 5]), atol=1e-5)
    assert np.isnan(np.asarray(step(None)[0])).all()
    assert all(np.isnan(np.asarray(x[:, 8:])).all() and not np.isnan(np.asarray(x[:, :8])).any()
               for x in jax.tree.leaves(new_cache))
