"""Bits per byte: cross-entropy normalised by the bytes the targets stand for.

bpb = sum of nats over targets with token_bytes > 0 / (ln 2 * sum of their bytes). Special tokens
(0 bytes) and ignored targets (< 0) count for neither, so the figure does not depend on the
vocabulary and compares across tokenizers. Sums run over the global (sharded) batch.

Under several processes each one reads its own share of the rows, and the shares may run out at
different batches; every process stops at the first batch that some process lacks, so none waits
in a step the others never enter, and the figure covers the batches all of them had.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanochat_jax import sharding
from nanochat_jax.evals.processes import every_process


def make_bpb_sums(graphdef, token_bytes: np.ndarray, mesh, rules):
    """Jitted (params, inputs, targets) -> (sum of nats, sum of bytes) over one batch."""
    token_bytes = jnp.asarray(token_bytes, jnp.int32)

    @jax.jit
    def sums(params, inputs, targets):
        with sharding.activation_rules(mesh, rules):
            losses = nnx.merge(graphdef, params).token_losses(inputs, targets)
        nbytes = jnp.where(targets >= 0, token_bytes[jnp.maximum(targets, 0)], 0)
        return jnp.sum(jnp.where(nbytes > 0, losses, 0.0)), jnp.sum(nbytes)

    return sums


def bits_per_byte(sums_fn, params, batches) -> float:
    """bpb over an iterable of placed (inputs, targets) batches, up to the first one that some
    process lacks (see the module docstring)."""
    nats, nbytes = 0.0, 0
    batches = iter(batches)
    while every_process((batch := next(batches, None)) is not None):
        inputs, targets = batch
        batch_nats, batch_bytes = sums_fn(params, inputs, targets)
        nats += float(batch_nats)
        nbytes += int(batch_bytes)
    if nbytes == 0:
        raise ValueError("no target bytes to evaluate bits per byte on")
    return nats / (math.log(2) * nbytes)
