"""Evaluate a chat model on nanochat's six chat tasks and report ChatCORE.

    python -m launch.chat_eval                              # the latest sft checkpoint, all six tasks
    python -m launch.chat_eval -i mid -a "ARC-Easy|GSM8K" --max-problems 200
    python -m launch.chat_eval -a HumanEval --num-samples 10 --temperature 0.8     # pass@10
    python -m launch.chat_eval --config=tiny -i mid --no-behaviour               # no behaviour figures

ARC-Easy, ARC-Challenge and MMLU are scored from the logits of their answer letters; GSM8K,
HumanEval and SpellingBee sample through the engine (greedy, calculator on) and pass if any of
`--num-samples` completions passes. `--batch-size` is the prompts per forward pass of the former
and the rows decoding together for the latter. Task data comes from `--data-dir` (a folder laid
out as the offline datasets), by default the config's `chat.data_dir` ("offline": the subsets the
package ships; empty: `$NANOCHAT_TASK_DATA`, else downloaded). `--max-problems` defaults to the
config's `eval.chat_max_problems` (-1: all). `--config` also sets the mesh the batch is split over.

Unless `--no-behaviour`, the behaviour figures follow (`nanochat_jax.evals.behaviour`): on
held-out conversations (SFT's validation set) and the test splits of the arithmetic and spelling
tasks, at most `--max-problems` of each (256 when all), the share of greedy replies that end with
`<|assistant_end|>` within 128 tokens, the share of arithmetic replies that call the calculator,
and the arithmetic and spelling accuracy.
Last line: JSON with each task's accuracy, ChatCORE (`partial` when not all six ran), timings and
the behaviour figures.
"""
import argparse
import json
import time

import jax

from launch import run
from nanochat_jax import report, sharding
from nanochat_jax import model as model_lib
from nanochat_jax.checkpoint import STAGES
from nanochat_jax.config import config_from_args
from nanochat_jax.engine import Engine
from nanochat_jax.evals import behaviour, chat
from nanochat_jax.loading import load_model
from nanochat_jax.tasks import TaskDataError
from nanochat_jax.tasks.mixtures import sft_tasks
from nanochat_jax.tasks.sources import configured_data_dir


def add_arguments(parser):
    parser.add_argument("-i", "--source", default="sft", choices=STAGES, help="checkpoint stage (default: sft)")
    parser.add_argument("-g", "--tag", default=None, help="run tag (default: the most recent of the stage)")
    parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("-a", "--task-name", default="|".join(chat.TASKS),
                        help="tasks separated by | (default: all six)")
    parser.add_argument("-x", "--max-problems", type=int, default=None,
                        help="first N problems of each task, -1: all (default: the config's eval.chat_max_problems)")
    parser.add_argument("-n", "--num-samples", type=int, default=1, help="samples per generative problem (pass@k)")
    parser.add_argument("-t", "--temperature", type=float, default=0.0)
    parser.add_argument("-k", "--top-k", type=int, default=50)
    parser.add_argument("-m", "--max-new-tokens", type=int, default=512)
    parser.add_argument("-b", "--batch-size", type=int, default=32)
    parser.add_argument("--data-dir", default=None, help="local task data (default: the config's chat.data_dir)")
    parser.add_argument("--behaviour", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure the behaviour figures (default: on)")


def task_names(args, batch_shards: int) -> list[str]:
    """The tasks to run, after checking the flags (a clear message, not a traceback)."""
    names = list(dict.fromkeys(args.task_name.split("|")))
    unknown = [n for n in names if n not in chat.TASKS]
    if unknown:
        raise SystemExit(f"error: unknown task(s) {', '.join(unknown)}; choose from {'|'.join(chat.TASKS)}")
    if min(args.num_samples, args.top_k, args.max_new_tokens, args.batch_size) < 1 or args.temperature < 0:
        raise SystemExit("error: --num-samples, --top-k, --max-new-tokens and --batch-size must be >= 1, "
                         "--temperature >= 0")
    if args.max_problems is not None and args.max_problems < 1 and args.max_problems != -1:
        raise SystemExit("error: --max-problems (default: eval.chat_max_problems) must be >= 1, or -1 for all")
    if args.batch_size % batch_shards:
        raise SystemExit(f"error: --batch-size {args.batch_size} must be a multiple of the {batch_shards} ways "
                         "the mesh splits the batch")
    return names


def main(argv=None):
    cfg, args = config_from_args(argv, description=__doc__, add_arguments=add_arguments)
    mesh, rules = sharding.make_mesh(cfg.mesh), sharding.parse_rules(cfg.mesh.rules)
    if args.max_problems is None:
        args.max_problems = cfg.eval.chat_max_problems
    names = task_names(args, sharding.batch_shards(mesh, rules))
    max_problems = None if args.max_problems == -1 else args.max_problems
    data_dir = configured_data_dir(cfg.chat.data_dir) if args.data_dir is None else args.data_dir
    try:
        loaded = load_model(args.source, args.step, tag=args.tag)
        tasks = {name: chat.load_task(name, data_dir) for name in names}  # all data before any evaluation
        held_out = behaviour.held_out_tasks(sft_tasks(cfg)[1], data_dir) if args.behaviour else None
    except (TaskDataError, ValueError) as err:  # data not found or offline; a tokenizer that does not fit the model
        raise SystemExit(f"error: {err}") from None
    print(f"{args.source} model from {loaded.directory} (step {loaded.step})", flush=True)
    _, shapes, logical = model_lib.abstract_model(loaded.model_cfg)
    params = jax.device_put(loaded.params, sharding.named_shardings(logical, shapes, mesh, rules))
    scorer = chat.LetterScorer(loaded.graphdef, params, loaded.model_cfg, loaded.tokenizer, args.batch_size, mesh, rules)
    engine = Engine(loaded.graphdef, params, loaded.model_cfg, loaded.tokenizer)
    sampling = chat.Sampling(args.num_samples, args.max_new_tokens, args.temperature, args.top_k,
                             max_rows=max(args.batch_size, args.num_samples))  # a problem's samples decode together

    start, results = time.perf_counter(), []
    for name, task in tasks.items():
        try:
            if task.eval_type == "categorical":
                results.append(chat.evaluate_categorical(name, task, scorer, max_problems))
            else:
                results.append(chat.evaluate_generative(name, task, engine, sampling, max_problems))
        except chat.ChatEvalError as err:  # answer letters this tokenizer splits
            raise SystemExit(f"error: {name}: {err}") from None
    accuracies = {r.name: r.accuracy for r in results}
    score, partial = chat.chatcore(accuracies)
    figures = None
    if held_out is not None:
        figures = behaviour.behaviour_figures(engine, loaded.tokenizer, held_out,
                                              max_problems or behaviour.PROMPTS_PER_KIND, max_rows=args.batch_size)

    print(f"\n{'task':<14} {'accuracy':>9} {'problems':>9} {'seconds':>9} {'problems/s':>11}")
    for r in results:
        print(f"{r.name:<14} {r.accuracy:>9.4f} {r.problems:>9} {r.seconds:>9.1f} {r.problems_per_s:>11.2f}")
    for r in results:
        if r.too_long:
            print(f"{r.name}: {r.too_long} prompts did not fit the {loaded.model_cfg.sequence_len}-token context "
                  "and count as failed")
    over = f"partial: over {', '.join(accuracies)} only" if partial else "over all six tasks"
    print(f"ChatCORE: {score:.4f} ({over})")
    behaviour_items = () if figures is None else behaviour.report_items(figures)
    if figures is not None:
        headline, table = behaviour_items
        print(f"\nBehaviour (greedy, at most {figures['max_new_tokens']} new tokens):\n{table}")
        print("\n".join(f"{name}: {'-' if value is None else f'{value:.4f}'}" for name, value in headline.items()))

    settings = {"source": args.source, "step": loaded.step, "max problems": max_problems,
                "num samples": args.num_samples, "temperature": args.temperature, "top k": args.top_k,
                "max new tokens": args.max_new_tokens}
    chatcore_items = {"ChatCORE": score, "ChatCORE partial": partial, "ChatCORE over": ", ".join(accuracies)}
    report.log(f"Chat evaluation {args.source}", settings, accuracies, chatcore_items, *behaviour_items)
    result = {"source": args.source, "step": loaded.step, "accuracy": accuracies, "chatcore": score,
              "partial": partial, "problems": {r.name: r.problems for r in results},
              "seconds": {r.name: r.seconds for r in results},
              "problems_per_s": {r.name: r.problems_per_s for r in results},
              "too_long": {r.name: r.too_long for r in results},
              "behaviour": figures, "total_seconds": time.perf_counter() - start}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run(main)
