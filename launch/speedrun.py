"""The whole pipeline, stage after stage, ending in report.md with nanochat's final table.

    python -m launch.speedrun --config=tiny          # CPU, no network
    python -m launch.speedrun --config=tiny --rl     # ... and RL on generated arithmetic
    python -m launch.speedrun --config=d20 --rl      # 8xH100

Stages run as subprocesses with the same config and overrides: tokenizer training and
evaluation, base training, base loss, base evaluation (CORE), midtraining, chat evaluation of the
mid model, SFT, chat evaluation of the SFT model, and with `--rl` RL and its chat evaluation. A
stage that finished before (its result is stored under $NANOCHAT_BASE_DIR/speedrun/<config>/) is
skipped, so re-running after an interruption picks up where it stopped (a training stage resumes
from its checkpoint); `--force` reruns everything. Writes the report to
$NANOCHAT_BASE_DIR/report/report.md and copies it to the working directory. Afterwards
`python -m launch.chat_cli` talks to the newest stage, `python -m launch.chat_web` serves it.
The last line is JSON with each stage's wall time.
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

# (name of the finished-stage marker, launcher module, the launcher's own arguments)
STAGES = (
    ("tok_train", "tok_train", ()),
    ("tok_eval", "tok_eval", ()),
    ("base_train", "base_train", ()),
    ("base_loss", "base_loss", ()),
    ("base_eval", "base_eval", ()),
    ("mid_train", "mid_train", ()),
    ("chat_eval_mid", "chat_eval", ("--source=mid",)),
    ("chat_sft", "chat_sft", ()),
    ("chat_eval_sft", "chat_eval", ("--source=sft",)),
)
RL_STAGES = (
    ("chat_rl", "chat_rl", ()),
    ("chat_eval_rl", "chat_eval", ("--source=rl",)),
)


def run_stage(module: str, args: list[str]) -> dict:
    """Run `python -m launch.<module> args`, streaming its output; its JSON result, or exit on failure."""
    command = [sys.executable, "-m", f"launch.{module}", *args]
    print(f"\n=== {module}: {' '.join(command[1:])}", flush=True)
    last_line = ""
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if line.strip():
                last_line = line.strip()
    if proc.returncode != 0:
        raise SystemExit(f"stage {module} failed with exit code {proc.returncode}; fix it and re-run the "
                         f"same command to continue from this stage")
    return json.loads(last_line)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--rl", action="store_true", help="also run RL and evaluate its model")
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
    results, wall = {}, {}
    for name, module, own_args in STAGES + (RL_STAGES if args.rl else ()):
        marker = done_dir / f"{name}.json"
        if marker.exists():
            print(f"=== {name}: done before, skipping ({marker})", flush=True)
            results[name] = json.loads(marker.read_text())
            wall[name] = results[name].get("wall_time_s")
            continue
        t0 = time.time()
        results[name] = run_stage(module, [*stage_args, *own_args])
        wall[name] = round(time.time() - t0, 1)
        marker.write_text(json.dumps({**results[name], "wall_time_s": wall[name]}))
    report.log("Speedrun", {"config": args.config, "rl": args.rl},
               {f"{name} wall time (s)": seconds for name, seconds in wall.items() if seconds is not None})
    out = report.generate(copy_to=Path.cwd(), tag=args.config)
    chat = results.get("chat_eval_rl" if args.rl else "chat_eval_sft", {})
    summary = {"config": args.config, "wall_time_s": round(time.time() - start, 1), "stage_wall_time_s": wall,
               "report": str(out), "val_bpb": results["base_loss"].get("val_bpb"),
               "train_bpb": results["base_loss"].get("train_bpb"), "core": results["base_eval"].get("core"),
               "chatcore": chat.get("chatcore")}
    print(f"\nreport: {out} (copied to ./report.md)")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    run(main)
