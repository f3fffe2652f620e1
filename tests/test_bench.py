"""launch.bench_train ends with a JSON line; --steps=0 reads counts without allocating weights."""
import json
import os
import subprocess
import sys


def run_bench(*args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user has
    proc = subprocess.run([sys.executable, "-m", "launch.bench_train", *args], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_counts_only_for_d32():
    result = run_bench("--config=d32", "--steps=0")
    assert result["num_params"] == 1_879_048_192
    assert result["flops_per_token"] == 12_079_595_520
    assert result["step_time_s"] is None and result["mfu"] is None


def test_tiny_steps_report_throughput():
    result = run_bench("--config=tiny", "--config.model.depth=2", "--steps=2", "--warmup=0")
    for key in ("num_params", "flops_per_token", "step_time_s", "tokens_per_s", "mfu", "peak_mem_bytes",
                "num_devices"):
        assert key in result
    assert result["step_time_s"] > 0 and result["tokens_per_s"] == result["tokens_per_step"] / result["step_time_s"]
    assert result["mfu"] is None  # no peak FLOP/s for CPUs
    assert result["peak_mem_bytes"] > 0 and result["num_devices"] == 1
