"""The whole pipeline, stage after stage, ending in report.md.

    python -m launch.speedrun --config=tiny     # CPU, no network: about 6 minutes on 2 cores
    python -m launch.speedrun --config=d20      # 8xH100

Stages run as subprocesses with the same config and overrides: tokenizer training, tokenizer
evaluation, base training, base loss, base evaluation (CORE). A stage that finished before (its result is stored under
$NANOCHAT_BASE_DIR/speedrun/<config>/) is skipped, so re-running after an interruption picks up
where it stopped (base training resumes from its checkpoint); `--force` reruns everything.
Writes the report to $NANOCHAT_BASE_DIR/report/report.md and copies it to the working directory.
"""
import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from launch import run
from nanochat_jax import paths, report
from nanochat_jax.config import config_from_args

STAGES = ("tok_train", "tok_eval", "base_train", "base_loss", "base_eval")


def run_stage(stage: str, args: list[str]) -> dict:
    """Run `python -m launch.<stage> args`, streaming its output; its JSON result, or exit on failure."""
    command = [sys.executable, "-m", f"launch.{stage}", *args]
    print(f"\n=== {stage}: {' '.join(command[1:])}", flush=True)
    last_line = ""
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if line.strip():
                last_line = line.strip()
    if proc.returncode != 0:
        raise SystemExit(f"stage {stage} failed with exit code {proc.returncode}; fix it and re-run the "
                         f"same command to continue from this stage")
    return json.loads(last_line)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--force", action="store_true", help="rerun stages that already finished")
    args, overrides = parser.parse_known_args(argv)
    stage_args = [f"--config={args.config}", *overrides]
    config_from_args(stage_args)  # reject unknown keys and bad values before any stage starts
    done_dir = paths.base_dir() / "speedrun" / args.config
    if args.force and done_dir.exists():
        shutil.rmtree(done_dir)
    done_dir.mkdir(parents=True, exist_ok=True)
    if not (report.report_dir() / report.HEADER).exists() or not any(done_dir.iterdir()):
        report.reset()

    start = time.time()
    results = {}
    for stage in STAGES:
        marker = done_dir / f"{stage}.json"
        if marker.exists():
            print(f"=== {stage}: done before, skipping ({marker})", flush=True)
            results[stage] = json.loads(marker.read_text())
            continue
        results[stage] = run_stage(stage, stage_args)
        marker.write_text(json.dumps(results[stage]))
    out = report.generate(copy_to=Path.cwd(), tag=args.config)
    summary = {"config": args.config, "wall_time_s": round(time.time() - start, 1), "report": str(out),
               "val_bpb": results["base_loss"].get("val_bpb"), "train_bpb": results["base_loss"].get("train_bpb"),
               "core": results["base_eval"].get("core")}
    print(f"\nreport: {out} (copied to ./report.md)")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    run(main)
