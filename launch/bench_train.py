"""Benchmark the training step on random tokens: step time, tokens/s, MFU and peak memory.

    python -m launch.bench_train --config=d20 --steps=10
    python -m launch.bench_train --config=d32 --steps=0     # counts only: no weights allocated

The last line is one JSON object (num_params, flops_per_token, step_time_s, tokens_per_s, mfu,
peak_mem_bytes, num_devices, ...). Compilation and `--warmup` steps are not timed.
"""
import json
import statistics
import time

import jax
import numpy as np

from launch import run
from nanochat_jax import hardware, sharding
from nanochat_jax import model as model_lib
from nanochat_jax.config import config_from_args
from nanochat_jax.train import build_training


def add_arguments(parser):
    parser.add_argument("--steps", type=int, default=10, help="timed steps (0: report counts only)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")


def main(argv=None):
    cfg, args = config_from_args(argv, description=__doc__, add_arguments=add_arguments)
    if args.steps < 0 or args.warmup < 0:
        raise SystemExit("--steps and --warmup must be >= 0")
    sharding.initialize_distributed()
    model_cfg = model_lib.GPTConfig.from_config(cfg.model)
    result = {
        "config": cfg.name,
        "num_params": model_lib.num_params(model_cfg),
        "flops_per_token": model_lib.flops_per_token(model_cfg),
        "num_devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "step_time_s": None, "tokens_per_s": None, "mfu": None, "peak_mem_bytes": None,
    }
    print(f"{cfg.name}: {result['num_params']:,} params, {result['flops_per_token']:.6e} FLOPs/token, "
          f"{result['num_devices']} x {result['device_kind']}, compute {model_cfg.compute_dtype}, "
          f"attention {model_cfg.attention}", flush=True)
    if args.steps > 0:
        result.update(run_benchmark(cfg, args.steps, args.warmup))
    print(json.dumps(result))
    return result


def run_benchmark(cfg, steps: int, warmup: int) -> dict:
    training = build_training(cfg, num_iterations=steps + warmup + 1)
    accum, micro, seq = training.batch_shape
    tokens_per_step = accum * micro * seq
    print(f"batch: {accum} micro-batch(es) x {micro} sequences x {seq} tokens = {tokens_per_step:,} tokens/step, "
          f"mesh {dict(training.mesh.shape)}", flush=True)
    params, opt_state = training.init(jax.random.key(cfg.seed))
    rng = np.random.default_rng(cfg.seed)
    tokens = rng.integers(0, training.model_cfg.vocab_size, size=(accum, micro, seq + 1), dtype=np.int32)
    batch = training.place_batch(tokens[..., :-1], tokens[..., 1:])

    t0 = time.perf_counter()
    params, opt_state, metrics = training.step(params, opt_state, batch)
    jax.block_until_ready(metrics)
    print(f"compile + first step: {time.perf_counter() - t0:.1f}s, loss {float(metrics['loss']):.4f}", flush=True)
    for _ in range(warmup):
        params, opt_state, metrics = training.step(params, opt_state, batch)
    jax.block_until_ready(metrics)

    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        params, opt_state, metrics = training.step(params, opt_state, batch)
        loss = float(metrics["loss"])  # a host read: the step is finished when it returns
        times.append(time.perf_counter() - t0)
        tps = tokens_per_step / times[-1]
        mfu = hardware.mfu(model_lib.flops_per_token(training.model_cfg), tps, jax.device_count())
        mfu_text = "n/a" if mfu is None else f"{100 * mfu:.1f}%"
        print(f"step {i + 1}/{steps}: loss {loss:.4f} | {times[-1] * 1000:.1f} ms | {tps:,.0f} tok/s | MFU {mfu_text}",
              flush=True)
    step_time = statistics.median(times)
    tokens_per_s = tokens_per_step / step_time
    return {
        "tokens_per_step": tokens_per_step,
        "step_time_s": step_time,
        "tokens_per_s": tokens_per_s,
        "mfu": hardware.mfu(model_lib.flops_per_token(training.model_cfg), tokens_per_s, jax.device_count()),
        "peak_mem_bytes": hardware.peak_memory_bytes(),
    }


if __name__ == "__main__":
    run(main)
