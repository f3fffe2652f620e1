"""One process of the multi-host test: a few FSDP training steps on a fixed batch, then evaluation.

Run as `python multihost_worker.py LOCAL_DEVICES [PLAN]`. With JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID set it joins a multi-process run through
`initialize_distributed()`; without them it is the single-process reference. Every process builds
the same global batch from a fixed seed, so all runs over the same number of global devices must
report the same losses. PLAN, a JSON object {"dir", "bpb_batches", "bundles"}, then has the trained
parameters evaluated as base training does, each process with its own share of the data: bits per
byte over the first bpb_batches[process] micro-batches of its rows of a fixed token stream, and CORE
on the bundle dir/bundles[process] with the tokenizer in dir/tokenizer. The last line of stdout is
the JSON result.
"""
import json
import os
import sys
from pathlib import Path

# The CPU device count is fixed when jax starts, so it is set before jax is imported (a later
# flag overrides an inherited one). CPU only: the test must not depend on an accelerator.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + f" --xla_force_host_platform_device_count={int(sys.argv[1])}").strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from nanochat_jax import sharding, train  # noqa: E402
from nanochat_jax.config import load_config  # noqa: E402
from nanochat_jax.evals.bpb import bits_per_byte, make_bpb_sums  # noqa: E402
from nanochat_jax.evals.bundle import load_bundle  # noqa: E402
from nanochat_jax.evals.core import CoreEvaluator  # noqa: E402
from nanochat_jax.tokenizer import Tokenizer  # noqa: E402

STEPS = 3
BPB_BATCHES = 3  # micro-batches in the token stream; a process may read fewer
CORE_PER_TASK = 4


def small_config(num_devices: int):
    """`tiny` shrunk to a few ms per step, with 2 micro-batches so the accumulation scan runs too."""
    c = load_config("tiny")
    c.model.depth = 2
    c.model.vocab_size = 512
    c.model.sequence_len = 64
    c.train.device_batch_size = 2
    c.train.total_batch_size = 2 * 2 * 64 * num_devices
    c.train.num_iterations = 10
    return c


def evaluate(training, params, plan: dict) -> dict:
    """bpb and CORE with this process's share of the rows and its own bundle (see the docstring)."""
    me, root = jax.process_index(), Path(plan["dir"])
    tok = Tokenizer.load(root / "tokenizer")
    _, micro, seq = training.batch_shape
    local = micro // jax.process_count()
    stream = np.random.default_rng(1).integers(0, tok.vocab_size, (BPB_BATCHES, micro, seq + 1), dtype=np.int32)
    mine = stream[:plan["bpb_batches"][me], me * local:(me + 1) * local]
    put = lambda rows: sharding.put_local_batch(rows, training.micro_sharding, (micro, seq))
    sums = make_bpb_sums(training.graphdef, tok.token_bytes(), training.mesh, training.rules)
    bpb = bits_per_byte(sums, params, ((put(rows[:, :-1]), put(rows[:, 1:])) for rows in mine))
    core = CoreEvaluator(training.graphdef, tok, training.mesh, training.rules,
                         load_bundle(root / plan["bundles"][me]), CORE_PER_TASK)(params)
    return {"bpb": bpb, "core": core.core, "core_tasks": list(core.tasks), "missing": core.missing}


def main():
    # Before any other jax call: joining later fails, or silently runs each process alone.
    sharding.initialize_distributed()
    cfg = small_config(jax.device_count())
    training = train.build_training(cfg)
    params, opt_state = training.init(jax.random.key(cfg.seed))
    accum, batch, seq = training.batch_shape
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (accum, batch, seq + 1), dtype=np.int32)
    inputs, targets = training.place_batch(tokens[..., :-1], tokens[..., 1:])
    losses = []
    for _ in range(STEPS):
        params, opt_state, metrics = training.step(params, opt_state, (inputs, targets))
        losses.append(float(metrics["loss"]))
    result = {"process_index": jax.process_index(), "process_count": jax.process_count(),
              "device_count": jax.device_count(), "local_device_count": jax.local_device_count(), "losses": losses}
    if len(sys.argv) > 2:
        result.update(evaluate(training, params, json.loads(sys.argv[2])))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
