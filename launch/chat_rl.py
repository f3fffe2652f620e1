"""RL on a verifiable task: nanochat's chat_rl (REINFORCE with a per-question mean baseline).

    python -m launch.chat_rl --config=tiny                        # the latest sft checkpoint
    python -m launch.chat_rl --config=d20 --source=sft             # GSM8K train, 8 GPUs of one host

Starts from the `--source` checkpoint's weights (sft by default) with a fresh optimizer: cfg.train's
learning rates x rl.init_lr_frac, decaying linearly to 0 over rl.num_epochs x training problems //
rl.examples_per_step steps. Each step samples rl.num_samples answers to each of rl.examples_per_step
problems (calculator on, all rows decoding together), rewards them, and takes one optimizer step
on the sampled tokens weighted by their advantage (see nanochat_jax/rl.py). The task is the
config's (nanochat_jax/tasks/mixtures.py: GSM8K, or generated arithmetic problems when
chat.data_dir=offline, as tiny has it), or `--task=module:Class` for one's own. pass@1..rl.eval_samples on rl.eval_examples test problems at step 0, every
rl.eval_every steps and at the end; checkpoints to checkpoints/rl/<config> every rl.save_every steps,
at the end and on SIGTERM/SIGINT; re-running the same command resumes exactly (the data position
and every sample's seed follow from the step). The last line is JSON.
"""
import json

import jax

from launch import run
from nanochat_jax import report, rl, sharding
from nanochat_jax.checkpoint import STAGES, Checkpointer, checkpoint_dir, tokenizer_hash
from nanochat_jax.config import config_from_args
from nanochat_jax.loading import open_stage_source
from nanochat_jax.tasks import TaskDataError
from nanochat_jax.tasks.mixtures import rl_tasks
from nanochat_jax.train import Hook, build_training, fit, require_same_horizon, resume_or_start


def add_arguments(parser):
    parser.add_argument("--source", default="sft", choices=[s for s in STAGES if s != "rl"],
                        help="the checkpoint to start from (default: sft)")
    parser.add_argument("--tag", default=None, help="its run tag (default: the most recent of the stage)")
    parser.add_argument("--task", default=None,
                        help="module:Class of a task with train and test splits and a reward (default: the "
                             "config's, GSM8K or offline arithmetic)")
    parser.add_argument("--max-rows", type=int, default=256, help="most answers decoding at once (default: 256)")


def main(argv=None):
    cfg, args = config_from_args(argv, description=__doc__, add_arguments=add_arguments)
    sharding.initialize_distributed()
    if jax.process_count() > 1:
        raise SystemExit("error: chat_rl runs in one process (its rollouts are not split over hosts); "
                         "use the devices of one host")
    if args.max_rows < 1 or cfg.rl.max_examples == 0 or cfg.rl.max_examples < -1:
        raise SystemExit("error: --max-rows must be at least 1, rl.max_examples -1 (all) or at least 1")
    checkpointer = Checkpointer(checkpoint_dir("rl", cfg.name), keep=cfg.train.checkpoint_keep,
                                every=cfg.rl.save_every)
    try:
        rl.check_settings(cfg.rl)
        if args.task is None:
            train_task, test_task = rl_tasks(cfg)
        else:
            train_task, test_task = (rl.load_task(args.task, split) for split in ("train", "test"))
        num_examples = len(train_task) if cfg.rl.max_examples < 0 else min(cfg.rl.max_examples, len(train_task))
        steps = rl.num_steps(cfg.rl, num_examples)
        source, resuming = open_stage_source(cfg, "rl", checkpointer, source=args.source, tag=args.tag)
    except (TaskDataError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    cfg, tok, r = rl.training_config(source.config), source.tokenizer, cfg.rl
    training = build_training(cfg, num_iterations=steps)
    task_name = args.task or type(train_task).__name__
    print(f"RL on {task_name} from {source.directory} (step {source.step}): {steps} steps x {r.examples_per_step} "
          f"problems x {r.num_samples} samples, {jax.device_count()} devices", flush=True)

    if not resuming:
        source.carry_tokenizer(checkpointer.directory)
    batches = rl.RolloutBatches(training, tok, train_task, r, seed=cfg.seed, num_examples=num_examples,
                                max_rows=args.max_rows)
    tok_hash = tokenizer_hash(tok)
    state = resume_or_start(training, checkpointer, batches, tok_hash,
                            lambda: training.start_from(source.load_params(training.abstract_state()[0])))
    require_same_horizon(state, steps, checkpointer.directory, "rl.max_examples, rl.examples_per_step, rl.num_epochs")

    def evaluate(params, step):
        figures = rl.pass_at_k(batches.engine_for(params), test_task, num_problems=r.eval_examples,
                               num_samples=r.eval_samples, max_tokens=r.max_new_tokens, temperature=r.temperature,
                               top_k=r.top_k or None, max_rows=args.max_rows)
        return figures | ({f"start_{k}": v for k, v in figures.items()} if step == 0 else {})

    state = fit(training, state, batches, checkpointer, config=cfg, tok_hash=tok_hash,
                hooks=(Hook("pass@k", r.eval_every, evaluate, at_start=True),))
    checkpointer.close()

    meta = state.meta
    rewards = [m["mean_reward"] for m in report.read_metrics(checkpointer.directory / "metrics.jsonl")
               if "mean_reward" in m]
    quarter = max(1, len(rewards) // 4)
    result = {"task": task_name, "source": args.source, "step": state.step, "num_steps": steps,
              **{k: v for k, v in meta.items() if k.startswith(("pass@", "start_pass@"))},
              "mean_reward": batches.last.mean_reward if batches.last else None,
              # does the reward rise? the mean over the first and the last quarter of the steps
              "mean_reward_first_quarter": sum(rewards[:quarter]) / quarter if rewards else None,
              "mean_reward_last_quarter": sum(rewards[-quarter:]) / quarter if rewards else None,
              "rollout_tokens_per_s": batches.tokens_per_s, "train_time_s": meta.get("train_time_s"),
              "checkpoint": str(checkpointer.directory)}
    report.log("Chat RL", {k: v for k, v in result.items() if v is not None and k != "checkpoint"},
               {"config": cfg.name, "examples per step": r.examples_per_step, "samples": r.num_samples,
                "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}"})
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run(main)
