"""Supervised fine-tuning: nanochat's chat_sft, one conversation per row, only the assistant trained.

    python -m launch.chat_sft --config=tiny             # the latest mid checkpoint, offline mixture
    python -m launch.chat_sft --config=d20 --source=base

Starts from the `--source` checkpoint's weights (mid by default) with a fresh optimizer at
cfg.train's learning rates x sft.init_lr_frac, decaying linearly to 0 over sft.num_epochs x
conversations // sft.examples_per_step steps, Muon's momentum constant. Each step takes
sft.examples_per_step conversations (over all processes, each reading its own) as micro-batches
of sft.device_batch_size rows per device, padded to one width per step: the next multiple of a
quarter of the context, so at most four widths compile. Targets are the assistant's tokens only
(nanochat_jax.data.chat.SFTLoader); the loss is the mean over the step's supervised tokens.
Validation loss (per supervised token over sft.eval_steps val micro-batches; 0: none) at step 0,
every sft.eval_every steps and at the end; MMLU and ARC-Easy accuracy (letter scoring, the first
sft.mc_max_problems problems, -1: all) every sft.mc_every steps and at the end. Checkpoints go to
checkpoints/sft/<config> every sft.checkpoint_every steps, at the end and on SIGTERM/SIGINT;
re-running the same command resumes exactly (nanochat cannot resume SFT). The last line is JSON.
"""
import copy
import itertools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from launch import run
from nanochat_jax import report, sharding
from nanochat_jax.checkpoint import STAGES, Checkpointer, checkpoint_dir, tokenizer_hash
from nanochat_jax.config import config_from_args
from nanochat_jax.data.chat import sft_loader
from nanochat_jax.evals.chat import ChatEvalError, LetterScorer, evaluate_categorical, letter_token_ids
from nanochat_jax.evals.processes import every_process, gather_json
from nanochat_jax.loading import open_stage_source
from nanochat_jax.tasks import TaskDataError
from nanochat_jax.tasks.base import LETTERS
from nanochat_jax.tasks.mixtures import mc_eval_tasks, sft_tasks
from nanochat_jax.train import Hook, build_training, fit, require_same_horizon, resume_or_start

WIDTHS = 4  # padded widths per context: rows are padded to the next multiple of sequence_len / WIDTHS


def add_arguments(parser):
    parser.add_argument("--source", default="mid", choices=[s for s in STAGES if s != "sft"],
                        help="the checkpoint to start from (default: mid)")
    parser.add_argument("--tag", default=None, help="its run tag (default: the most recent of the stage)")
    parser.add_argument("--step", type=int, default=None, help="its step (default: the latest)")


def sft_config(cfg):
    """The run's config with SFT's optimizer and batch: cfg.train's learning rates x
    sft.init_lr_frac, linear to 0 from the start, Muon's momentum at its final value (nanochat's
    chat_sft), and a step of sft.examples_per_step rows of sft.device_batch_size per device, which
    `build_training` turns into the micro-batches per step."""
    cfg = copy.deepcopy(cfg)
    t, s = cfg.train, cfg.sft
    t.init_lr_frac = s.init_lr_frac
    t.warmup_ratio, t.warmdown_ratio, t.final_lr_frac = 0.0, 1.0, 0.0
    t.muon_momentum_start = t.muon_momentum
    t.device_batch_size = s.device_batch_size
    t.total_batch_size = s.examples_per_step * cfg.model.sequence_len
    return cfg


def check_batch(sft_cfg, batch_shards: int) -> None:
    """Conversations per step must fill whole micro-batches of every batch shard."""
    examples, rows = sft_cfg.examples_per_step, sft_cfg.device_batch_size
    if min(examples, rows, sft_cfg.num_epochs) < 1:
        raise ValueError("sft.examples_per_step, sft.device_batch_size and sft.num_epochs must be at least 1")
    if examples % min(rows * batch_shards, examples) or examples % batch_shards:
        raise ValueError(f"sft.examples_per_step {examples} is not a multiple of sft.device_batch_size {rows} x "
                         f"{batch_shards} batch shards (or, when smaller, of the {batch_shards} batch shards)")


def common_width(inputs: np.ndarray, targets: np.ndarray, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """This process's rows padded to the widest of every process's rows (one global array needs
    one width); inputs with `pad_id`, targets with -1 (ignored). One process: unchanged."""
    if jax.process_count() == 1:
        return inputs, targets
    extra = max(gather_json(inputs.shape[1])) - inputs.shape[1]
    return (np.pad(inputs, ((0, 0), (0, extra)), constant_values=pad_id),
            np.pad(targets, ((0, 0), (0, extra)), constant_values=-1))


class ConversationSteps:
    """Each step's conversations as placed (inputs, targets) of shape (accum, micro, width)."""

    def __init__(self, training, loader):
        self.training, self.loader = training, loader

    def __next__(self):
        inputs, targets = common_width(*next(self.loader), self.loader.pad_id)
        accum, micro, _ = self.training.batch_shape
        shape = (accum, micro, inputs.shape[1])
        place = lambda x: sharding.put_local_batch(x.reshape(accum, -1, x.shape[1]), self.training.batch_sharding, shape)
        return place(inputs), place(targets)

    def get_state(self) -> dict:
        return self.loader.get_state()

    def set_state(self, state: dict) -> None:
        self.loader.set_state(state)

    def step_figures(self) -> dict:
        return {"epoch": self.loader.progress}


def make_loss_sums(graphdef, mesh, rules):
    """Jitted (params, inputs, targets) -> (sum of nats, supervised tokens) of one batch."""
    @jax.jit
    def sums(params, inputs, targets):
        with sharding.activation_rules(mesh, rules):
            losses = nnx.merge(graphdef, params).token_losses(inputs, targets)
        return jnp.sum(losses), jnp.sum(targets >= 0)

    return sums


def mean_loss(sums_fn, params, micro_batches, place, pad_id: int) -> float:
    """Mean loss per supervised token over this process's host (inputs, targets) micro-batches,
    placed by `place`, up to the first that some process lacks (see nanochat_jax.evals.bpb)."""
    nats, count = 0.0, 0
    batches = iter(micro_batches)
    while every_process((batch := next(batches, None)) is not None):
        batch_nats, batch_count = sums_fn(params, *place(*common_width(*batch, pad_id)))
        nats, count = nats + float(batch_nats), count + int(batch_count)
    if count == 0:
        raise ValueError("no supervised tokens to evaluate the loss on")
    return nats / count


def main(argv=None):
    cfg, args = config_from_args(argv, description=__doc__, add_arguments=add_arguments)
    sharding.initialize_distributed()
    if cfg.sft.max_examples == 0 or cfg.sft.max_examples < -1:
        raise SystemExit("error: sft.max_examples must be -1 (all) or at least 1")
    checkpointer = Checkpointer(checkpoint_dir("sft", cfg.name), keep=cfg.train.checkpoint_keep,
                                every=cfg.sft.checkpoint_every)
    mesh = sharding.make_mesh(cfg.mesh)
    try:
        check_batch(cfg.sft, sharding.batch_shards(mesh, sharding.parse_rules(cfg.mesh.rules)))
        source, resuming = open_stage_source(cfg, "sft", checkpointer, source=args.source, tag=args.tag, step=args.step)
        train_task, val_task = sft_tasks(cfg)
        mc_tasks = mc_eval_tasks(cfg) if cfg.sft.mc_max_problems else {}
    except (TaskDataError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    if cfg.sft.max_examples > 0:
        train_task.stop = min(cfg.sft.max_examples, len(train_task))
    cfg, tok = sft_config(source.config), source.tokenizer
    s = cfg.sft
    if mc_tasks:
        try:
            letter_token_ids(tok, LETTERS[:4])
        except ChatEvalError as err:
            raise SystemExit(f"error: sft.mc_max_problems is set but {err}") from None
    steps = s.num_epochs * len(train_task) // s.examples_per_step
    if steps < 1:
        raise SystemExit(f"error: {s.num_epochs} epoch(s) of {len(train_task)} conversations is less than one step "
                         f"of sft.examples_per_step {s.examples_per_step}")
    training = build_training(cfg, mesh=mesh, num_iterations=steps)
    accum, micro, _ = training.batch_shape
    print(f"SFT {'(resuming) ' if resuming else ''}from {source.directory} (step {source.step}): "
          f"{len(train_task):,} conversations, {s.num_epochs} epoch(s) = {steps:,} steps x {s.examples_per_step} "
          f"conversations ({accum} micro-batch(es) of {micro}); {jax.device_count()} devices", flush=True)

    if not resuming:
        source.carry_tokenizer(checkpointer.directory)
    bucket = math.ceil(cfg.model.sequence_len / WIDTHS)
    local_micro = micro // jax.process_count()
    loader = sft_loader(cfg, train_task, tok, rows=training.local_rows, bucket=bucket)
    batches = ConversationSteps(training, loader)
    tok_hash = tokenizer_hash(tok)
    state = resume_or_start(training, checkpointer, batches, tok_hash,
                            lambda: training.start_from(source.load_params(training.abstract_state()[0])))
    require_same_horizon(state, steps, checkpointer.directory, "sft.*")
    state.meta.setdefault("source", f"{source.directory} step {source.step}")

    sums_fn = make_loss_sums(training.graphdef, training.mesh, training.rules)

    def place_micro(inputs, targets):
        shape = (micro, inputs.shape[1])
        return tuple(sharding.put_local_batch(x, training.micro_sharding, shape) for x in (inputs, targets))

    def val_loss(params, _step):
        with sft_loader(cfg, val_task, tok, rows=local_micro, bucket=bucket, loop=False) as rows:
            loss = mean_loss(sums_fn, params, itertools.islice(rows, s.eval_steps), place_micro, rows.pad_id)
        return {"val_loss": loss, "min_val_loss": min(loss, state.meta.get("min_val_loss", math.inf))}

    scorer = LetterScorer(training.graphdef, None, training.model_cfg, tok, batch_size=micro * max(1, 16 // micro),
                          mesh=training.mesh, rules=training.rules)

    def mc_accuracy(params, _step):
        scorer.params = params
        limit = None if s.mc_max_problems < 0 else s.mc_max_problems
        return {f"{name.lower().replace('-', '_')}_acc": evaluate_categorical(name, task, scorer, limit).accuracy
                for name, task in mc_tasks.items()}

    hooks = []
    if s.eval_steps > 0:
        hooks.append(Hook("val_loss", s.eval_every, val_loss, at_start=True))
    if mc_tasks:
        hooks.append(Hook("mc", s.mc_every, mc_accuracy))
    state = fit(training, state, batches, checkpointer, config=cfg, tok_hash=tok_hash, hooks=tuple(hooks))
    loader.close()
    checkpointer.close()

    meta = state.meta
    result = {"step": state.step, "num_iterations": steps, "val_loss": meta.get("val_loss"),
              "min_val_loss": meta.get("min_val_loss"),
              **{k: v for k, v in meta.items() if k.endswith("_acc")}, "epoch": loader.progress,
              "conversations": len(train_task), "tokens_per_s": meta.get("tokens_per_s"),
              "train_time_s": meta.get("train_time_s"), "source": meta["source"],
              "checkpoint": str(checkpointer.directory)}
    if jax.process_index() == 0:
        report.log("Chat SFT", {k: v for k, v in result.items() if v is not None and k != "checkpoint"},
                   {"config": cfg.name, "examples per step": s.examples_per_step,
                    "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}"})
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    run(main)
