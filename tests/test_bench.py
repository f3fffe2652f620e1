"""launch.bench_train ends with a JSON line; --steps=0 reads counts without allocating weights."""
import json
import os
import subprocess
import sys
import time


def run_bench(*args):
    """The last stdout line of launch.bench_train as JSON, and the run's wall time in seconds."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user has
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "launch.bench_train", *args], capture_output=True, text=True,
                          timeout=300, env=env)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall


def test_counts_only_for_d32():
    result, _ = run_bench("--config=d32", "--steps=0")
    assert result["num_params"] == 1_879_048_192
    assert result["flops_per_token"] == 12_079_595_520
    assert result["step_time_s"] is None and result["mfu"] is None


def test_tiny_steps_report_throughput():
    # 512 tokens per step in micro-batches of 4 x 64: two micro-batches
    steps = 3
    result, wall = run_bench("--config=tiny", "--config.model.depth=2", "--config.model.sequence_len=64",
                             "--config.train.device_batch_size=4", "--config.train.total_batch_size=512",
                             f"--steps={steps}", "--warmup=0")
    for key in ("num_params", "flops_per_token", "step_time_s", "tokens_per_s", "mfu", "peak_mem_bytes",
                "num_devices"):
        assert key in result
    assert result["tokens_per_step"] == 512
    # the timed steps ran inside the subprocess, so together they took less than its wall time;
    # hence a lower bound on the throughput that does not use the launcher's own timing
    assert 0 < steps * result["step_time_s"] < wall
    assert result["tokens_per_s"] > steps * 512 / wall
    assert result["mfu"] is None  # no peak FLOP/s for CPUs
    assert result["peak_mem_bytes"] > 0 and result["num_devices"] == 1
