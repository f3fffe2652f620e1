"""Midtraining: nanochat's mid_train, the base model trained on one pass over a chat mixture.

    python -m launch.mid_train --config=tiny     # offline mixture (chat.data_dir=offline), CPU
    python -m launch.mid_train --config=d20      # SmolTalk, MMLU auxiliary_train, GSM8K, ...

Starts from the `--source` checkpoint's weights (base by default; `--tag`, `--step` pick the run
and step) with a fresh optimizer at cfg.train's learning rates x mid.init_lr_frac and base's
schedule shape: no warmup, the last 20% linear to 0, Muon's momentum warmup as in pretraining.
Conversations are rendered, packed best-fit into BOS-aligned rows and every token is trained on
(nanochat_jax.data.chat.MidtrainLoader). The run is one epoch of the mixture: the schedule needs
the horizon up front, so the mixture's tokens (each conversation cropped to a row, as the loader
does) are counted, every conversation of a mixture up to EXACT_COUNT_LIMIT, else the mean of an
evenly spaced sample of SAMPLE_SIZE times the count, and divided by the tokens of a step.
Validation bits per byte on the val mixture (packed the same way, one pass, up to mid.eval_tokens)
at step 0, every mid.eval_every steps and at the end. Checkpoints go to checkpoints/mid/<config>
every mid.checkpoint_every steps, at the end and on SIGTERM/SIGINT; re-running the same command
resumes exactly from there, without reading the source again. The last line is JSON.
"""
import copy
import json
import math

import jax
from tqdm import tqdm

from launch import run
from nanochat_jax import report, sharding
from nanochat_jax.checkpoint import STAGES, Checkpointer, checkpoint_dir, tokenizer_hash
from nanochat_jax.config import config_from_args
from nanochat_jax.conversation import render_conversation
from nanochat_jax.data.chat import midtrain_loader
from nanochat_jax.evals.bpb import bits_per_byte, make_bpb_sums
from nanochat_jax.loading import open_stage_source
from nanochat_jax.tasks import TaskDataError
from nanochat_jax.tasks.mixtures import mid_tasks
from nanochat_jax.train import Hook, PlacedRows, build_training, fit, require_same_horizon, resume_or_start

EXACT_COUNT_LIMIT = 20_000  # conversations rendered one by one to count a mixture's tokens (tiny: 6,149)
SAMPLE_SIZE = 2_000         # ... above that, an evenly spaced sample of this many (d20's is ~850K)


def add_arguments(parser):
    parser.add_argument("--source", default="base", choices=[s for s in STAGES if s != "mid"],
                        help="the checkpoint to start from (default: base)")
    parser.add_argument("--tag", default=None, help="its run tag (default: the most recent of the stage)")
    parser.add_argument("--step", type=int, default=None, help="its step (default: the latest)")


def mid_config(cfg):
    """The run's config with midtraining's optimizer: cfg.train's learning rates x mid.init_lr_frac,
    constant, then the last 20% linear to 0 (nanochat's mid_train)."""
    cfg = copy.deepcopy(cfg)
    t = cfg.train
    t.init_lr_frac = cfg.mid.init_lr_frac
    t.warmup_ratio, t.warmdown_ratio, t.final_lr_frac = 0.0, 0.2, 0.0
    return cfg


def epoch_tokens(task, tokenizer, row_len: int) -> tuple[int, str]:
    """Tokens one pass over `task` feeds the packer, each conversation cropped to `row_len`, and
    how they were counted."""
    n = len(task)
    exact = n <= EXACT_COUNT_LIMIT
    indices = range(n) if exact else sorted({i * n // SAMPLE_SIZE for i in range(SAMPLE_SIZE)})
    lengths = [len(render_conversation(tokenizer, task[i], max_tokens=row_len)[0])
               for i in tqdm(indices, desc="counting the mixture's tokens", unit="conversation",
                             disable=jax.process_index() != 0)]
    if exact:
        return sum(lengths), f"all {n:,} conversations"
    return round(sum(lengths) / len(lengths) * n), f"mean of {len(lengths):,} evenly spaced of {n:,} conversations"


def main(argv=None):
    cfg, args = config_from_args(argv, description=__doc__, add_arguments=add_arguments)
    sharding.initialize_distributed()
    if cfg.mid.max_examples == 0 or cfg.mid.max_examples < -1:
        raise SystemExit("error: mid.max_examples must be -1 (all) or at least 1")
    checkpointer = Checkpointer(checkpoint_dir("mid", cfg.name), keep=cfg.train.checkpoint_keep,
                                every=cfg.mid.checkpoint_every)
    try:
        source, resuming = open_stage_source(cfg, "mid", checkpointer, source=args.source, tag=args.tag, step=args.step)
        train_task, val_task = mid_tasks(cfg)
    except (TaskDataError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    if cfg.mid.max_examples > 0:
        train_task.stop = min(cfg.mid.max_examples, len(train_task))
    cfg, tok = mid_config(source.config), source.tokenizer
    seq = cfg.model.sequence_len
    if cfg.train.total_batch_size % seq:
        raise SystemExit(f"error: train.total_batch_size {cfg.train.total_batch_size} is not a multiple of "
                         f"model.sequence_len {seq}")
    rows_per_step = cfg.train.total_batch_size // seq
    tokens, counted = epoch_tokens(train_task, tok, seq + 1)
    steps = tokens // (rows_per_step * (seq + 1))
    if steps < 1:
        raise SystemExit(f"error: the mixture ({tokens:,} tokens) fills less than one step of {rows_per_step} "
                         f"rows of {seq + 1} tokens")
    training = build_training(cfg, num_iterations=steps)
    micro = training.batch_shape[1]
    print(f"midtraining {'(resuming) ' if resuming else ''}from {source.directory} (step {source.step}): "
          f"{len(train_task):,} conversations, {tokens:,} tokens ({counted}) = one epoch of {steps:,} steps x "
          f"{rows_per_step} rows of {seq + 1} tokens; {jax.device_count()} devices", flush=True)

    if not resuming:
        source.carry_tokenizer(checkpointer.directory)
    loader = midtrain_loader(cfg, train_task, tok, rows=training.local_rows)
    batches = PlacedRows(training, loader)
    tok_hash = tokenizer_hash(tok)
    state = resume_or_start(training, checkpointer, batches, tok_hash,
                            lambda: training.start_from(source.load_params(training.abstract_state()[0])))
    require_same_horizon(state, steps, checkpointer.directory, "mid.max_examples, train.total_batch_size")
    state.meta.setdefault("source", f"{source.directory} step {source.step}")

    sums_fn = make_bpb_sums(training.graphdef, tok.token_bytes(), training.mesh, training.rules)

    def val_bpb(params, _step):
        with midtrain_loader(cfg, val_task, tok, rows=micro // jax.process_count(), loop=False) as val_rows:
            bpb = bits_per_byte(sums_fn, params, training.micro_batches(val_rows, training.eval_batches(cfg.mid.eval_tokens)))
        return {"val_bpb": bpb, "min_val_bpb": min(bpb, state.meta.get("min_val_bpb", math.inf))}

    state = fit(training, state, batches, checkpointer, config=cfg, tok_hash=tok_hash,
                hooks=(Hook("val_bpb", cfg.mid.eval_every, val_bpb, at_start=True),))
    loader.close()
    checkpointer.close()

    meta = state.meta
    result = {"step": state.step, "num_iterations": steps, "val_bpb": meta.get("val_bpb"),
              "min_val_bpb": meta.get("min_val_bpb"), "epochs_read": loader.progress, "conversations": len(train_task),
              "mixture_tokens": tokens, "tokens_counted": counted, "tokens_per_s": meta.get("tokens_per_s"),
              "train_time_s": meta.get("train_time_s"), "source": meta["source"],
              "checkpoint": str(checkpointer.directory)}
    if jax.process_index() == 0:
        report.log("Midtraining", {k: v for k, v in result.items() if v is not None and k != "checkpoint"},
                   {"config": cfg.name, "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}"})
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    run(main)
