"""CORE of a trained model, as nanochat's base_eval computes it, many examples per forward pass.

    python -m launch.base_eval --config=tiny                       # packaged subset, no network
    python -m launch.base_eval --config=d20 --download-bundle      # nanochat's full eval bundle
    python -m launch.base_eval --config=tiny --source=sft --step=300 --max-per-task=50 --bundle-dir=DIR

Loads the parameters of the latest (or --step) checkpoint in checkpoints/<source>/<config name>.
The bundle is --bundle-dir, else $NANOCHAT_EVAL_BUNDLE, else $NANOCHAT_BASE_DIR/eval_bundle (what
--download-bundle fetches), else the subset packaged with the library (18 of the 22 tasks, the
first 500 of nanochat's shuffle each). Examples per task: --max-per-task, else
eval.core_max_per_task (-1: all). Prints a line per task and a table, writes
$NANOCHAT_BASE_DIR/base_eval/<source>_<tag>_<step>.csv and the report's section; the last line is
JSON (core, tasks_evaluated, per_task, partial, missing, examples_per_s and wall_time_s of the
scoring, prepare_s of rendering and tokenizing, ...).
--one-example-per-forward runs nanochat's batching (one example's options per pass) for comparison.
"""
import csv
import json
import time

import jax

from launch import run
from nanochat_jax import paths, report, sharding
from nanochat_jax import model as model_lib
from nanochat_jax.checkpoint import STAGES
from nanochat_jax.config import config_from_args
from nanochat_jax.evals.bundle import BundleError, download_bundle, resolve_bundle
from nanochat_jax.evals.core import CoreEvaluator
from nanochat_jax.loading import load_model


def add_arguments(parser):
    parser.add_argument("--source", default="base", choices=STAGES, help="checkpoint stage (default: base)")
    parser.add_argument("--tag", default=None, help="run tag (default: the config's name)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--max-per-task", type=int, default=None, help="examples per task, -1 for all "
                        "(default: eval.core_max_per_task)")
    parser.add_argument("--bundle-dir", default=None, help="an unpacked eval bundle (default: see above)")
    parser.add_argument("--download-bundle", action="store_true", help="fetch nanochat's eval_bundle.zip first")
    parser.add_argument("--one-example-per-forward", action="store_true", help="nanochat's batching, for timing")


def write_csv(path, result) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Task", "Accuracy", "Centered", "Examples", "Seconds"])
        for t in result.tasks.values():
            writer.writerow([t.label, f"{t.accuracy:.6f}", f"{t.centered:.6f}", t.examples, f"{t.seconds:.2f}"])
        writer.writerow(["CORE", "", f"{result.core:.6f}", result.examples, f"{result.seconds:.2f}"])


def main(argv=None):
    cfg, args = config_from_args(argv, description=__doc__, add_arguments=add_arguments)
    sharding.initialize_distributed()
    max_per_task = cfg.eval.core_max_per_task if args.max_per_task is None else args.max_per_task
    if max_per_task == 0 or max_per_task < -1:
        raise SystemExit(f"error: --max-per-task must be -1 (all) or at least 1, got {max_per_task}")
    tag = args.tag or cfg.name
    try:
        bundle = resolve_bundle(download_bundle() if args.download_bundle and not args.bundle_dir else args.bundle_dir)
        loaded = load_model(args.source, args.step, tag=tag)
    except ValueError as err:  # a malformed bundle, a tokenizer that does not match the model
        raise SystemExit(f"error: {err}") from None
    mesh, rules = sharding.make_mesh(cfg.mesh), sharding.parse_rules(cfg.mesh.rules)
    _, shapes, logical = model_lib.abstract_model(loaded.model_cfg)
    params = jax.device_put(loaded.params, sharding.named_shardings(logical, shapes, mesh, rules))
    evaluator = CoreEvaluator(loaded.graphdef, loaded.tokenizer, mesh, rules, bundle, max_per_task,
                              tokens_per_device=cfg.eval.core_tokens_per_device,
                              one_example_per_forward=args.one_example_per_forward)
    main_process = jax.process_index() == 0
    say = print if main_process else (lambda *_: None)
    say(f"{args.source} model from {loaded.directory} (step {loaded.step}); CORE on {bundle.name}, "
        f"{'all' if max_per_task < 0 else f'at most {max_per_task}'} examples per task", flush=True)
    t0 = time.perf_counter()
    try:
        evaluator.prepare()
    except (BundleError, ValueError) as err:  # max_per_task beyond a packaged crop, too few for the shots
        raise SystemExit(f"error: {err}") from None
    prepare_s = time.perf_counter() - t0
    say(f"prompts rendered and tokenized in {prepare_s:.1f}s", flush=True)
    result = evaluator(params, log=lambda line: say(line, flush=True))

    summary = {"source": args.source, "step": loaded.step, "bundle": bundle.name, "max_per_task": max_per_task,
               "one_example_per_forward": args.one_example_per_forward, "prepare_s": round(prepare_s, 3),
               **result.summary()}
    if main_process:
        print("\n" + result.table())
        if result.partial:
            print(f"CORE is partial: over {len(result.tasks)} tasks; missing {', '.join(result.missing)}")
        if result.tasks:
            write_csv(paths.base_dir() / "base_eval" / f"{args.source}_{tag}_{loaded.step:06d}.csv", result)
        report.log("Base model evaluation" + ("" if args.source == "base" else f" {args.source}"),
                   {"source": args.source, "step": loaded.step, "bundle": bundle.name, "max per task": max_per_task,
                    "core": result.core, "core partial": result.partial, "tasks evaluated": len(result.tasks),
                    "missing": ", ".join(result.missing) or "none"},
                   result.table())
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    run(main)
