"""The speedrun spine: every stage runs in order from one command, a re-run skips finished
stages, and report.md collects each stage's figures and the final table."""
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
        "--config.train.eval_tokens=512", "--config.train.sample_every=0", "--config.eval.core_max_per_task=8",
        "--config.mid.max_examples=40", "--config.mid.eval_tokens=512", "--config.sft.device_batch_size=2",
        "--config.sft.examples_per_step=4", "--config.sft.max_examples=16", "--config.sft.eval_steps=2",
        "--config.sft.mc_max_problems=4", "--config.eval.chat_max_problems=2"]
STAGES = ("tok_train", "tok_eval", "base_train", "base_loss", "base_eval", "mid_train", "chat_eval_mid", "chat_sft",
          "chat_eval_sft")


def small_bundle(path: Path) -> Path:
    """A CORE bundle of three short zero-shot tasks, one of each type, from the shared one: the
    speedrun's CORE stage runs for real, in seconds."""
    source = SHARED / "eval_bundle"
    tasks = [("copa", "commonsense_reasoning/copa.jsonl", "multiple_choice"),
             ("winograd", "language_understanding/winograd_wsc.jsonl", "schema"),
             ("lambada_openai", "language_understanding/lambada_openai.jsonl", "language_modeling")]
    (path / "eval_data").mkdir(parents=True)
    yaml = ["icl_tasks:"]
    for label, uri, kind in tasks:
        (path / "eval_data" / uri).parent.mkdir(parents=True, exist_ok=True)
        (path / "eval_data" / uri).write_bytes((source / "eval_data" / uri).read_bytes())
        yaml += [f"- label: {label}", f"  dataset_uri: {uri}", "  num_fewshot: [0]", f"  icl_task_type: {kind}"]
    (path / "core.yaml").write_text("\n".join(yaml) + "\n")
    (path / "eval_meta_data.csv").write_bytes((source / "eval_meta_data.csv").read_bytes())
    return path


def speedrun(base_dir: Path, cwd: Path, *extra) -> tuple[str, dict]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["NANOCHAT_BASE_DIR"] = str(base_dir)
    bundle = base_dir.parent / "bundle"
    env["NANOCHAT_EVAL_BUNDLE"] = str(bundle if bundle.exists() else small_bundle(bundle))
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
    for stage in STAGES:
        assert (base / "speedrun" / "tiny" / f"{stage}.json").exists(), stage
    assert sorted(summary["stage_wall_time_s"]) == sorted(STAGES)
    assert summary["val_bpb"] > 0 and summary["train_bpb"] > 0
    report = (cwd / "report.md").read_text()
    for section in ("## Tokenizer training", "## Tokenizer evaluation", "## Base model training",
                    "## Base model loss", "## Base model evaluation", "## Midtraining", "## Chat evaluation mid",
                    "## Chat SFT", "## Chat evaluation sft", "## Speedrun", "Total wall clock time"):
        assert section in report
    assert -1 <= summary["core"] <= 1
    core_row = next(line for line in report.splitlines() if line.startswith("| CORE |"))
    assert core_row.split("|")[2].strip() == f"{summary['core']:.4f}"  # the final table's BASE cell
    arc_row = next(line for line in report.splitlines() if line.startswith("| ARC-Easy |")).split("|")
    mid_cell, sft_cell = arc_row[3].strip(), arc_row[4].strip()  # columns BASE, MID, SFT, RL
    assert 0 <= float(mid_cell) <= 1 and 0 <= float(sft_cell) <= 1 and arc_row[5].strip() == ""
    for stage in ("base", "mid", "sft"):
        assert f"![{stage} training curves]({stage}-curves.png)" in report and (cwd / f"{stage}-curves.png").exists()
    marker = base / "speedrun" / "tiny" / "base_loss.json"
    marker.write_text(json.dumps({"val_bpb": -1.0, "train_bpb": -1.0}))  # a rerun must read the markers back
    out, again = speedrun(base, cwd)
    assert out.count("done before, skipping") == len(STAGES) and again["val_bpb"] == -1.0


def test_speedrun_with_rl_adds_rl_and_its_evaluation(tmp_path, monkeypatch):
    """--rl appends RL and the RL model's chat evaluation, and the summary's ChatCORE is that last
    evaluation's (stages are recorded here, not run)."""
    from launch import speedrun
    calls = []

    def fake_stage(module, args):
        calls.append((module, [a for a in args if not a.startswith("--config")]))
        return {"chatcore": 0.5 if "--source=rl" in args else 0.1, "val_bpb": 1.0, "train_bpb": 1.0, "core": 0.0}

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(speedrun, "run_stage", fake_stage)
    summary = speedrun.main(["--config=tiny", "--rl"])
    assert calls[-4:] == [("chat_sft", []), ("chat_eval", ["--source=sft"]), ("chat_rl", []),
                          ("chat_eval", ["--source=rl"])]
    assert [m for m, _ in calls[:6]] == ["tok_train", "tok_eval", "base_train", "base_loss", "base_eval", "mid_train"]
    assert summary["chatcore"] == 0.5


def test_speedrun_rejects_bad_overrides_before_starting(tmp_path):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "launch.speedrun", "--config=tiny", "--config.train.lr=1"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "unknown config key 'train.lr'" in proc.stderr
    assert not (tmp_path / "speedrun").exists()
