"""The speedrun spine: every stage runs in order from one command, a re-run skips finished
stages, and report.md collects each stage's figures."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
ARGS = ["--config=tiny", "--config.tokenizer.vocab_size=512", "--config.tokenizer.max_chars=2000000",
        "--config.model.depth=2", "--config.model.sequence_len=64", "--config.train.device_batch_size=4",
        "--config.train.total_batch_size=256", "--config.train.num_iterations=6",
        "--config.train.eval_tokens=512", "--config.train.sample_every=0"]


def speedrun(base_dir: Path, cwd: Path, *extra) -> tuple[str, dict]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["NANOCHAT_BASE_DIR"] = str(base_dir)
    if (SHARED / "datasets" / "tiktoken").exists():
        env["NANOCHAT_TIKTOKEN_DIR"] = str(SHARED / "datasets" / "tiktoken")
    proc = subprocess.run([sys.executable, "-m", "launch.speedrun", *ARGS, *extra], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_speedrun_runs_every_stage_then_skips_them(tmp_path):
    base, cwd = tmp_path / "base", tmp_path / "work"
    cwd.mkdir()
    out, summary = speedrun(base, cwd)
    for stage in ("tok_train", "tok_eval", "base_train", "base_loss"):
        assert f"=== {stage}: " in out and (base / "speedrun" / "tiny" / f"{stage}.json").exists()
    assert summary["val_bpb"] > 0 and summary["train_bpb"] > 0
    report = (cwd / "report.md").read_text()
    for section in ("## Tokenizer training", "## Tokenizer evaluation", "## Base model training",
                    "## Base model loss", "Total wall clock time"):
        assert section in report
    out, again = speedrun(base, cwd)
    assert out.count("done before, skipping") == 4 and again["val_bpb"] == summary["val_bpb"]


def test_speedrun_rejects_bad_overrides_before_starting(tmp_path):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "launch.speedrun", "--config=tiny", "--config.train.lr=1"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "unknown config key 'train.lr'" in proc.stderr
    assert not (tmp_path / "speedrun").exists()
