"""The training step's loss: one mean over every supervised token of the step, however the tokens
fall into micro-batches (an empty micro-batch neither dilutes it nor makes a NaN), and the plain
weighted sum when per-token weights are given. Checked against NumPy cross-entropy of the model's
own logits, on one device and on 8."""
import functools

import jax
import numpy as np
import pytest

from nanochat_jax import model as model_lib
from nanochat_jax import sharding
from nanochat_jax.config import load_config
from nanochat_jax.train import build_training

SEQ, ROWS = 16, 8


@functools.cache  # one build (and compiled step) per geometry for the whole module
def make_training(devices: int, accum: int):
    cfg = load_config("tiny")
    cfg.model.depth, cfg.model.vocab_size, cfg.model.sequence_len = 1, 64, SEQ
    cfg.train.device_batch_size = ROWS // accum // devices
    cfg.train.total_batch_size = ROWS * SEQ
    return build_training(cfg, mesh=sharding.make_mesh(cfg.mesh, jax.devices()[:devices]), num_iterations=10)


def numpy_token_losses(training, params, inputs, targets):
    """Cross-entropy per position from the model's logits, computed in float64 NumPy."""
    logits = np.asarray(model_lib.forward(training.graphdef, jax.device_get(params), inputs), np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, np.maximum(targets, 0)[..., None], -1)[..., 0]
    return np.where(targets >= 0, -picked, 0.0)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, 64, (ROWS, SEQ), dtype=np.int32)
    targets = rng.integers(0, 64, (ROWS, SEQ), dtype=np.int32)
    targets[:4] = -1  # the first half of the rows (the whole first micro-batch at accum 2) is unsupervised
    targets[4:, :11] = -1  # and the rest mostly so, as SFT rows are
    return inputs, targets


@pytest.mark.parametrize("devices,accum", [(1, 1), (1, 2), (8, 1)])
def test_loss_is_the_mean_over_the_steps_supervised_tokens(batch, devices, accum):
    inputs, targets = batch
    training = make_training(devices, accum)
    params, opt_state = training.init(jax.random.key(0))
    expected = numpy_token_losses(training, params, inputs, targets)
    expected = expected.sum() / (targets >= 0).sum()
    shape = (accum, ROWS // accum, SEQ)
    placed = training.place_batch(inputs.reshape(shape), targets.reshape(shape))
    _, _, metrics = training.step(params, opt_state, placed)
    assert np.isfinite(float(metrics["grad_norm"])) and int(metrics["tokens"]) == (targets >= 0).sum()
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=2e-5)


def test_no_supervised_token_gives_zero_loss_not_nan(batch):
    inputs, _ = batch
    training = make_training(1, 1)
    params, opt_state = training.init(jax.random.key(0))
    ignored = np.full_like(inputs, -1)[None]
    _, _, metrics = training.step(params, opt_state, training.place_batch(inputs[None], ignored))
    assert float(metrics["loss"]) == 0.0 and float(metrics["grad_norm"]) == 0.0


def test_weights_give_the_weighted_sum(batch):
    inputs, targets = batch
    training = make_training(1, 2)
    params, opt_state = training.init(jax.random.key(0))
    weights = np.random.default_rng(1).normal(size=inputs.shape).astype(np.float32)
    expected = (numpy_token_losses(training, params, inputs, targets) * weights).sum()
    shape = (2, ROWS // 2, SEQ)
    placed = (*training.place_batch(inputs.reshape(shape), targets.reshape(shape)),
              sharding.put_global_batch(weights.reshape(shape), training.batch_sharding))
    _, _, metrics = training.step(params, opt_state, placed)
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-4, atol=1e-5)
