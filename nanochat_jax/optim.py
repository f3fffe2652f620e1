"""Muon for the block matrices, AdamW for the embedding and the LM head, and their schedules.

The optimizer is one Optax transformation whose state is a plain pytree: `optax.multi_transform`
routes each parameter by its path (`wte` -> embedding AdamW, `lm_head` -> unembedding AdamW,
`blocks/...` -> Muon), after an optional clip on the global gradient norm. nanochat's formulas
assume PyTorch's (out, in) weight layout; Flax kernels are (in, out), and the code below says
where that matters.
"""
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

NS_COEFFS = (3.4445, -4.7750, 2.0315)
GROUPS = {"wte": "embedding", "lm_head": "unembedding", "blocks": "matrix"}


def lr_multiplier(step, num_iterations: int, warmup_ratio: float, warmdown_ratio: float,
                  final_lr_frac: float):
    """nanochat's schedule: linear warmup, flat, then linear warmdown to `final_lr_frac`."""
    step = jnp.asarray(step, jnp.float32)
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    up = (step + 1) / max(warmup, 1)
    progress = (num_iterations - step) / max(warmdown, 1)
    down = progress + (1 - progress) * final_lr_frac
    return jnp.where(step < warmup, up, jnp.where(step <= num_iterations - warmdown, 1.0, down))


def muon_momentum(step, start: float, end: float, warmup_steps: int):
    """Muon's momentum rises linearly from `start` to `end` over the first `warmup_steps`."""
    frac = jnp.minimum(jnp.asarray(step, jnp.float32) / max(warmup_steps, 1), 1.0)
    return (1 - frac) * start + frac * end


def orthogonalize(g, steps: int = 5, dtype=jnp.bfloat16):
    """Newton-Schulz quintic iteration towards the nearest semi-orthogonal matrix, in `dtype`.

    Runs on the wide orientation (rows <= cols) of nanochat's PyTorch-layout matrix g.T, so it
    performs the same arithmetic as nanochat for square matrices too. The matrix products run in
    `dtype`; the scalar products and sums between them run in fp32 on the `dtype` values and are
    rounded once, as nanochat's compiled iteration does, whose `b * A + c * A @ A` is
    `b*A + (c*A) @ A`. (A Python float times a bf16 array would round the coefficient to bf16
    first in JAX, 3.4445 -> 3.4375.)
    """
    a, b, c = NS_COEFFS
    x = g.astype(dtype)
    transposed = x.shape[0] >= x.shape[1]  # g.T (PyTorch layout) is wide iff g is tall or square
    if transposed:
        x = x.T
    norm = (jnp.linalg.norm(x.astype(jnp.float32)) + 1e-7).astype(dtype)
    x = (_stored(x) / _stored(norm)).astype(dtype)
    for _ in range(steps):
        gram = x @ x.T
        poly = (b * _stored(gram) + _stored((c * _stored(gram)).astype(dtype) @ gram)).astype(dtype)
        x = (a * _stored(x) + _stored(poly @ x)).astype(dtype)
    return x.T if transposed else x


def _stored(x):
    """x in fp32, holding exactly the value a `x.dtype` array stores: XLA may otherwise skip the
    rounding of an fp32 result to bf16 when it is converted back (excess precision), and the
    iteration amplifies such differences to percents within five steps."""
    info = jnp.finfo(x.dtype)
    return jax.lax.reduce_precision(x.astype(jnp.float32), info.nexp, info.nmant)


def muon_lr_scale(shape) -> float:
    """sqrt(max(1, rows/cols)) in PyTorch's (out, in) layout, i.e. fan_out/fan_in for a Flax kernel."""
    fan_in, fan_out = shape
    return math.sqrt(max(1.0, fan_out / fan_in))


class MuonState(NamedTuple):
    count: jax.Array
    momentum: optax.Updates


def scale_by_muon(momentum_schedule, ns_steps: int = 5, ns_dtype=jnp.bfloat16) -> optax.GradientTransformation:
    """Nesterov momentum, then orthogonalisation and the aspect-ratio LR boost (no LR applied)."""

    def init(params):
        for p in jax.tree.leaves(params):
            if p.ndim != 2:
                raise ValueError(f"Muon needs 2-D parameters, got shape {p.shape}")
        return MuonState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params=None):
        mu = momentum_schedule(state.count)
        momentum = jax.tree.map(lambda buf, g: mu * buf + (1 - mu) * g, state.momentum, grads)
        nesterov = jax.tree.map(lambda buf, g: g + mu * (buf - g), momentum, grads)
        updates = jax.tree.map(  # the boost multiplies in fp32, as nanochat's `alpha` does
            lambda u: orthogonalize(u, ns_steps, ns_dtype).astype(u.dtype) * muon_lr_scale(u.shape), nesterov)
        return updates, MuonState(optax.safe_increment(state.count), momentum)

    return optax.GradientTransformation(init, update)


def param_labels(params):
    """The optimizer group of every parameter, from the first key of its path."""
    def label(path, _):
        top = path[0].key
        if top not in GROUPS:
            raise ValueError(f"parameter {jax.tree_util.keystr(path)} belongs to no optimizer group")
        return GROUPS[top]
    return jax.tree_util.tree_map_with_path(label, params)


def group_learning_rates(train_cfg, model_dim: int) -> dict[str, float]:
    """Peak LR of each group: AdamW LRs scale with (dim/768)^-0.5, Muon's does not."""
    scale = (model_dim / 768) ** -0.5
    return {
        "embedding": train_cfg.embedding_lr * scale * train_cfg.init_lr_frac,
        "unembedding": train_cfg.unembedding_lr * scale * train_cfg.init_lr_frac,
        "matrix": train_cfg.matrix_lr * train_cfg.init_lr_frac,
    }


def build_optimizer(train_cfg, model_dim: int, num_iterations: int) -> optax.GradientTransformation:
    t = train_cfg
    lrm = lambda step: lr_multiplier(step, num_iterations, t.warmup_ratio, t.warmdown_ratio, t.final_lr_frac)
    lrs = group_learning_rates(t, model_dim)

    def adamw(peak):
        return optax.adamw(lambda step: peak * lrm(step), b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps,
                           weight_decay=t.weight_decay)

    momentum = lambda step: muon_momentum(step, t.muon_momentum_start, t.muon_momentum,
                                          t.muon_momentum_warmup_steps)
    muon = optax.chain(scale_by_muon(momentum, t.muon_ns_steps),
                       optax.scale_by_learning_rate(lambda step: lrs["matrix"] * lrm(step)))
    tx = optax.multi_transform(
        {"embedding": adamw(lrs["embedding"]), "unembedding": adamw(lrs["unembedding"]), "matrix": muon},
        param_labels)
    if t.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(t.grad_clip), tx)
    return tx
