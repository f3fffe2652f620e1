"""nanochat_jax.optim against an independent NumPy transcription of nanochat's optimizer.

A wrong learning rate, a skipped schedule or a transposed orthogonalisation still trains, only
worse, so each piece is checked against nanochat's formulas. The reference works in PyTorch's
(out, in) layout, i.e. on kernel.T, so the Flax/PyTorch layout bookkeeping is checked too.
"""
import functools
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from nanochat_jax import optim
from nanochat_jax.config import load_config

NS_A, NS_B, NS_C = 3.4445, -4.7750, 2.0315
D, V = 16, 32
# Flax layouts (kernels are (fan_in, fan_out)): tall, wide and square.
NS_SHAPES = [(48, 16), (16, 48), (24, 24)]


def ns_reference(w, steps=5):
    """nanochat's zeropower_via_newtonschulz5 on an (out, in) matrix, in float64."""
    x = np.asarray(w, np.float64)
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    x = x / (np.linalg.norm(x) + 1e-7)
    for _ in range(steps):
        a = x @ x.T
        x = NS_A * x + (NS_B * a + NS_C * (a @ a)) @ x
    return x.T if transposed else x


def ns_bf16_reference(w, steps=5):
    """nanochat's zeropower_via_newtonschulz5 with its bf16 roundings, on an (out, in) matrix.

    Every tensor nanochat's compiled function stores is bf16; matrix products and the norm
    accumulate in fp32; what it fuses between two stored tensors (a product with an fp32 scalar,
    then a sum) is computed in fp32 and rounded once. Here sums run in float64, then round to
    fp32 (as an accumulator or FMA would) and to bf16.
    """
    def bf16(v):
        return np.asarray(v, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)

    a, b, c = np.float32(NS_A), np.float32(NS_B), np.float32(NS_C)
    x = bf16(w)
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    x = bf16(x / bf16(np.linalg.norm(x) + 1e-7))
    for _ in range(steps):
        gram = bf16(x @ x.T)
        poly = bf16(b * gram + bf16(bf16(c * gram) @ gram))
        x = bf16(a * x + bf16(poly @ x))
    return x.T if transposed else x


def lrm_reference(it, n, warmup_ratio, warmdown_ratio, final_lr_frac):
    """nanochat's get_lr_multiplier."""
    warmup, warmdown = round(warmup_ratio * n), round(warmdown_ratio * n)
    if it < warmup:
        return (it + 1) / warmup
    if it <= n - warmdown:
        return 1.0
    progress = (n - it) / warmdown
    return progress + (1 - progress) * final_lr_frac


def reference_updates(params, grad_steps, t, dim, n, ns=ns_reference):
    """nanochat's update of each step: Muon on blocks/*, AdamW on wte and lm_head.

    Takes and returns flat {path: array} dicts in Flax layout; Muon runs on the (out, in)
    transpose, orthogonalised by `ns`. Params are tracked because AdamW's weight decay reads them.
    """
    scale = (dim / 768) ** -0.5
    adam_lr = {"wte": t.embedding_lr * scale, "lm_head": t.unembedding_lr * scale}
    params = dict(params)
    m = {k: np.zeros_like(p) for k, p in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    buf = {k: np.zeros_like(p.T) for k, p in params.items()}
    steps = []
    for it, grads in enumerate(grad_steps):
        lrm = t.init_lr_frac * lrm_reference(it, n, t.warmup_ratio, t.warmdown_ratio, t.final_lr_frac)
        f = min(it / t.muon_momentum_warmup_steps, 1.0)
        mu = (1 - f) * t.muon_momentum_start + f * t.muon_momentum
        updates = {}
        for k, g in grads.items():
            if k[0] in adam_lr:
                b1, b2 = t.adam_b1, t.adam_b2
                m[k] = b1 * m[k] + (1 - b1) * g
                v[k] = b2 * v[k] + (1 - b2) * g ** 2
                m_hat, v_hat = m[k] / (1 - b1 ** (it + 1)), v[k] / (1 - b2 ** (it + 1))
                adam = m_hat / (np.sqrt(v_hat) + t.adam_eps)
                updates[k] = -adam_lr[k[0]] * lrm * (adam + t.weight_decay * params[k])
            else:
                g = g.T
                buf[k] = mu * buf[k] + (1 - mu) * g
                g = g + mu * (buf[k] - g)
                rows, cols = g.shape
                updates[k] = (-t.matrix_lr * lrm * math.sqrt(max(1, rows / cols)) * ns(g)).T
            params[k] = params[k] + updates[k]
        steps.append(updates)
    return steps


def flat(tree):
    """{tuple of keys: float64 array}, so the reference needs no pytree code."""
    return {tuple(k.key for k in path): np.asarray(x, np.float64)
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def random_tree(seed, scales=None):
    """A two-block param (or grad) tree in the model's layout; `scales` multiplies each group."""
    block = {"attn": {n: {"kernel": (D, D)} for n in ("c_q", "c_k", "c_v", "c_proj")},
             "mlp": {"c_fc": {"kernel": (D, 4 * D)}, "c_proj": {"kernel": (4 * D, D)}}}
    shapes = {"wte": (V, D), "lm_head": {"kernel": (D, V)}, "blocks": {0: block, 1: block}}
    scales = scales or {}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([scales.get(path[0].key, 1.0) * jax.random.normal(key, shape)
                              for key, (path, shape) in zip(keys, leaves)])


def train_cfg(**overrides):
    cfg = load_config("tiny").train
    for name, value in overrides.items():
        cfg[name] = value
    return cfg


def run(tx, params, grad_steps):
    """The updates of successive steps, applying each to the params as training does."""
    state = tx.init(params)
    update = jax.jit(tx.update)
    steps = []
    for grads in grad_steps:
        updates, state = update(grads, state, params)
        params = jax.tree.map(jnp.add, params, updates)
        steps.append(updates)
    return steps


def global_norm(tree):
    return float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(tree))))


def rel_err(x, ref):
    return np.linalg.norm(np.asarray(x, np.float64) - ref) / np.linalg.norm(ref)


@pytest.fixture
def float32_newton_schulz(monkeypatch):
    """build_optimizer has no NS dtype knob; float32 NS makes whole-optimizer comparisons tight."""
    monkeypatch.setattr(optim, "scale_by_muon", functools.partial(optim.scale_by_muon, ns_dtype=jnp.float32))


@pytest.mark.parametrize("shape", NS_SHAPES)
def test_orthogonalize_matches_nanochat(shape):
    kernel = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    expected = ns_reference(kernel.T).T
    np.testing.assert_allclose(optim.orthogonalize(jnp.asarray(kernel), dtype=jnp.float32), expected, atol=1e-5)


@pytest.mark.parametrize("shape", NS_SHAPES)
def test_bf16_orthogonalize_rounds_as_nanochat(shape):
    """bf16 NS has nanochat's roundings, not merely its precision: one step is bit-exact, and so
    are five here. Coefficients rounded to bf16 (3.4445 -> 3.4375) changed half the elements of
    one step and drifted 5-7% (Frobenius) in five, and so did fp32 scalar products whose bf16
    roundings XLA skipped under jit. The iteration amplifies any rounding difference, so five
    steps are held to 1%, not bits, against another CPU's accumulation order."""
    kernel = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    orthogonalize = jax.jit(optim.orthogonalize, static_argnames="steps")  # jitted, as training runs it
    one_step = orthogonalize(jnp.asarray(kernel), steps=1)
    assert one_step.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(one_step, np.float64), ns_bf16_reference(kernel.T, steps=1).T)
    five_steps = orthogonalize(jnp.asarray(kernel)).astype(jnp.float32)
    assert rel_err(five_steps, ns_bf16_reference(kernel.T).T) < 0.01


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", NS_SHAPES)
def test_orthogonalize_is_roughly_orthogonal(shape, dtype):
    """Singular values land near 1 (NS5 with these coefficients gives ~0.68..1.13).

    Input singular values span 10x: five steps cannot lift ones far below the Frobenius norm.
    """
    rng = np.random.default_rng(1)
    n = min(shape)
    u, _ = np.linalg.qr(rng.standard_normal((shape[0], n)))
    v, _ = np.linalg.qr(rng.standard_normal((shape[1], n)))
    kernel = (u * np.geomspace(1, 0.1, n)) @ v.T
    out = optim.orthogonalize(jnp.asarray(kernel, jnp.float32), dtype=dtype)
    sv = np.linalg.svd(np.asarray(out.astype(jnp.float32)), compute_uv=False)
    assert 0.5 < sv.min() and sv.max() < 1.5


def test_muon_lr_scale_boosts_only_tall_pytorch_matrices():
    assert optim.muon_lr_scale((D, 4 * D)) == 2  # c_fc: (out, in) = (4d, d)
    assert optim.muon_lr_scale((4 * D, D)) == 1  # mlp c_proj: (out, in) = (d, 4d)
    assert optim.muon_lr_scale((D, D)) == 1


@pytest.mark.parametrize("ns", ["float32", "bfloat16"])
def test_build_optimizer_matches_nanochat(ns, request):
    """Four steps of the whole optimizer, with the LR schedule, init_lr_frac, weight decay and
    momentum warmup all changing the result within those steps (lrm = 0.5, 1, 1, 0.7)."""
    if ns == "float32":
        request.getfixturevalue("float32_newton_schulz")
    n = 5
    t = train_cfg(warmup_ratio=0.4, warmdown_ratio=0.6, final_lr_frac=0.1, init_lr_frac=0.5,
                  muon_momentum_warmup_steps=3, weight_decay=0.1)
    params = random_tree(0)
    grad_steps = [random_tree(s, {"wte": 0.1, "lm_head": 3.0}) for s in range(1, 5)]
    got = run(optim.build_optimizer(t, D, n), params, grad_steps)
    expected = reference_updates(flat(params), [flat(g) for g in grad_steps], t, D, n,
                                 ns_reference if ns == "float32" else ns_bf16_reference)
    muon_errors = []
    for step, (got_step, want_step) in enumerate(zip(got, expected)):
        for k, got_leaf in flat(got_step).items():
            if k[0] == "blocks":
                muon_errors.append(rel_err(got_leaf, want_step[k]))
            else:
                np.testing.assert_allclose(got_leaf, want_step[k], rtol=1e-4, atol=1e-9, err_msg=str((step, k)))
    if ns == "float32":
        assert max(muon_errors) < 1e-5
    else:  # most updates bit-exact; where the fp32 momentum (float64 here) moves a bf16 input, NS
        # amplifies it (1.5% seen). Coefficients rounded to bf16 gave 5% median, 7% max.
        assert np.median(muon_errors) < 1e-3 and max(muon_errors) < 0.03


def test_group_learning_rates_d20():
    lrs = optim.group_learning_rates(load_config("d20").train, 1280)
    assert lrs == pytest.approx({"embedding": 0.15492, "unembedding": 0.0030984, "matrix": 0.02}, rel=1e-4)


def test_first_adam_step_is_plus_minus_lr():
    """Adam's first step is lr * sign(g): a direct read-out of each AdamW group's LR."""
    t = train_cfg()
    lrs = optim.group_learning_rates(t, 256)
    params, grads = random_tree(0), random_tree(1)
    tx = optim.build_optimizer(t, 256, 100)
    updates, _ = tx.update(grads, tx.init(params), params)
    for name, got, g in [("embedding", updates["wte"], grads["wte"]),
                         ("unembedding", updates["lm_head"]["kernel"], grads["lm_head"]["kernel"])]:
        np.testing.assert_allclose(got, -lrs[name] * np.sign(g), rtol=1e-5)


def test_param_labels():
    labels = optim.param_labels(random_tree(0))
    assert labels["wte"] == "embedding"
    assert labels["lm_head"] == {"kernel": "unembedding"}
    assert set(jax.tree.leaves(labels["blocks"])) == {"matrix"}
    assert len(jax.tree.leaves(labels["blocks"])) == 12
    with pytest.raises(ValueError, match="bogus"):
        optim.param_labels({"wte": jnp.zeros((V, D)), "bogus": {"kernel": jnp.zeros((D, D))}})


@pytest.mark.parametrize("step, warmup_ratio, final_lr_frac, expected", [
    (0, 0.0, 0.0, 1.0),
    (80, 0.0, 0.0, 1.0),     # last flat step: 80 <= 100 - 20
    (81, 0.0, 0.0, 0.95),    # first warmdown step: progress 19/20
    (99, 0.0, 0.0, 0.05),    # last step: progress 1/20
    (81, 0.0, 0.1, 0.955),
    (99, 0.0, 0.1, 0.145),
    (0, 0.05, 0.0, 0.2),     # warmup of 5 steps: (0 + 1) / 5
    (4, 0.05, 0.0, 1.0),     # last warmup step
    (5, 0.05, 0.0, 1.0),
    (80, 0.05, 0.0, 1.0),
    (81, 0.05, 0.0, 0.95),
])
def test_lr_multiplier(step, warmup_ratio, final_lr_frac, expected):
    assert float(optim.lr_multiplier(step, 100, warmup_ratio, 0.2, final_lr_frac)) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("step, expected", [(0, 0.85), (150, 0.90), (299, 0.85 / 300 + 0.95 * 299 / 300),
                                            (300, 0.95), (1000, 0.95)])
def test_muon_momentum(step, expected):
    assert float(optim.muon_momentum(step, 0.85, 0.95, 300)) == pytest.approx(expected, abs=1e-6)


@pytest.mark.usefixtures("float32_newton_schulz")
def test_grad_clip_rescales_to_global_norm():
    """A clipped step equals an unclipped one fed the grads rescaled to global norm grad_clip.

    A first, unclipped step leaves momentum and Adam state behind, so the second step depends on
    the scale of its grads (a lone first step would not: Adam and Muon are scale-invariant), and
    the groups' grad norms differ, so a per-group clip would not match.
    """
    clip = 1.0
    params = random_tree(0)
    g1 = random_tree(1)
    g1 = jax.tree.map(lambda g: 0.5 * clip / global_norm(g1) * g, g1)
    g2 = random_tree(2, {"wte": 0.1, "lm_head": 3.0})
    clipped = run(optim.build_optimizer(train_cfg(grad_clip=clip), D, 100), params,
                  [g1, jax.tree.map(lambda g: 1000 * g, g2)])
    unclipped_tx = optim.build_optimizer(train_cfg(grad_clip=0.0), D, 100)
    rescaled = run(unclipped_tx, params, [g1, jax.tree.map(lambda g: clip / global_norm(g2) * g, g2)])
    for got, want in zip(clipped, rescaled):
        # atol: Muon updates are ~1e-3 and five fp32 NS steps leave round-off of a few 1e-8
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-7), got, want)
    raw = run(unclipped_tx, params, [g1, jax.tree.map(lambda g: 1000 * g, g2)])
    assert not np.allclose(raw[1]["wte"], clipped[1]["wte"], rtol=1e-2)
