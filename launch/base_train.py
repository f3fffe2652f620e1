"""Pretrain the base model: nanochat's base_train on the sharded, jitted step.

    python -m launch.base_train --config=tiny     # bundled corpus, CPU, a few minutes
    python -m launch.base_train --config=d20      # FineWeb-Edu shards, 8xH100

Needs a tokenizer (`python -m launch.tok_train`). Horizon: train.num_iterations, else
train.target_flops, else train.target_param_data_ratio x params. Validation bits per byte every
train.eval_every steps on a fixed val slice, CORE every train.core_every steps and at the end (on
train.core_max_per_task examples per task; the bundle as in launch.base_eval), greedy samples
every train.sample_every steps, a log line per step (also appended as JSON to metrics.jsonl beside
the checkpoints). Checkpoints every train.checkpoint_every steps, at the end, and on SIGTERM/SIGINT,
each recording the tokenizer's sha256 (resuming with another tokenizer is refused); re-running the
same command resumes exactly from the latest good checkpoint. A NaN/inf loss stops the run (exit 3)
and keeps the last good checkpoint. The last line is JSON.
"""
import json
import math
import signal
import sys
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from launch import run
from nanochat_jax import hardware, paths, report, sharding
from nanochat_jax import model as model_lib
from nanochat_jax.checkpoint import Checkpointer, checkpoint_dir, tokenizer_hash
from nanochat_jax.config import config_from_args
from nanochat_jax.data.pretrain import pretrain_loader
from nanochat_jax.evals.bpb import bits_per_byte, make_bpb_sums
from nanochat_jax.evals.core import training_evaluator
from nanochat_jax.optim import lr_multiplier
from nanochat_jax.sampling import greedy_generate
from nanochat_jax.tokenizer import Tokenizer
from nanochat_jax.train import build_training

SAMPLE_PROMPTS = (
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
)


def load_tokenizer(cfg) -> Tokenizer:
    tok = Tokenizer.load(paths.tokenizer_dir())
    if tok.vocab_size != cfg.model.vocab_size:
        raise SystemExit(f"the tokenizer in {paths.tokenizer_dir()} has {tok.vocab_size:,} tokens but the config's model "
                         f"expects {cfg.model.vocab_size:,}: retrain it with `python -m launch.tok_train "
                         f"--config={cfg.name}`")
    return tok


def evaluate_bpb(cfg, training, tok, params, sums_fn, split: str) -> float:
    """bpb over the first train.eval_tokens tokens of a split: the same tokens every time."""
    _, micro, seq = training.batch_shape
    steps = max(1, cfg.train.eval_tokens // (micro * seq))
    one_micro = training.batch_shape[1:]

    def batches(loader):
        for _ in range(steps):
            rows = next(loader, None)
            if rows is None:
                return
            inputs = sharding.put_local_batch(rows[:, :-1], training.micro_sharding, one_micro)
            targets = sharding.put_local_batch(rows[:, 1:], training.micro_sharding, one_micro)
            yield inputs, targets

    with pretrain_loader(cfg, tok, split, rows=micro // jax.process_count(), loop=split == "train") as loader:
        return bits_per_byte(sums_fn, params, batches(loader))


def print_samples(training, tok, params) -> list[str]:
    prompts = [tok.encode(p, prepend="<|bos|>") for p in SAMPLE_PROMPTS]
    outputs = greedy_generate(training.graphdef, params, prompts, max_new_tokens=16)
    texts = [p + tok.decode(out) for p, out in zip(SAMPLE_PROMPTS, outputs)]
    if jax.process_index() == 0:
        for text in texts:
            print(f"  sample: {text!r}", flush=True)
    return texts


class StopRequest:
    """SIGTERM/SIGINT ask the loop to checkpoint and exit at the end of the current step.

    On several hosts the signal may reach the processes at different steps, and a checkpoint is
    a collective: so the processes agree on the flag every step (one tiny all-gather) and all
    stop at the same step."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        if self.signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\nreceived {signal.Signals(signum).name}: saving a checkpoint after this step", flush=True)

    def requested(self) -> bool:
        if jax.process_count() == 1:
            return self.signal is not None
        flags = multihost_utils.process_allgather(np.int32(self.signal or 0))
        self.signal = self.signal or int(np.max(flags)) or None
        return self.signal is not None


def main(argv=None):
    cfg, _ = config_from_args(argv, description=__doc__)
    sharding.initialize_distributed()
    tok = load_tokenizer(cfg)
    training = build_training(cfg)
    model_cfg, num_iterations = training.model_cfg, training.num_iterations
    n_params, flops_per_token = model_lib.num_params(model_cfg), model_lib.flops_per_token(model_cfg)
    accum, micro, seq = training.batch_shape
    tokens_per_step = accum * micro * seq
    print(f"{cfg.name}: {n_params:,} params, {num_iterations:,} steps x {tokens_per_step:,} tokens = "
          f"{num_iterations * tokens_per_step:,} tokens, {flops_per_token * tokens_per_step * num_iterations:.3e} FLOPs; "
          f"{jax.device_count()} devices, mesh {dict(training.mesh.shape)}, {accum} micro-batch(es) per step",
          flush=True)

    checkpointer = Checkpointer(checkpoint_dir("base", cfg.name), keep=cfg.train.checkpoint_keep,
                                every=cfg.train.checkpoint_every)
    loader = pretrain_loader(cfg, tok, "train", rows=training.local_rows)
    tok_hash = tokenizer_hash(tok)
    meta = {"min_val_bpb": math.inf, "train_time_s": 0.0}
    if checkpointer.latest_step() is not None:
        params_target, opt_target = training.abstract_state()
        restored = checkpointer.restore(params_target=params_target, opt_target=opt_target)
        params, opt_state, start = restored["params"], restored["opt_state"], restored["step"]
        loader.set_state(restored["data"])
        trained_with = restored["meta"].get("tokenizer_sha256")
        if trained_with not in (None, tok_hash):
            raise SystemExit(f"error: {paths.tokenizer_dir()} is not the tokenizer the checkpoint in "
                             f"{checkpointer.directory} was trained with (sha256 {tok_hash[:12]}... vs "
                             f"{trained_with[:12]}...): put that tokenizer back, or train from scratch elsewhere")
        meta.update(restored["meta"])
        print(f"resumed from step {start} in {checkpointer.directory}", flush=True)
    else:
        params, opt_state = training.init(jax.random.key(cfg.seed))
        start = 0
    if start >= num_iterations:
        print(f"already trained to step {start} of {num_iterations}", flush=True)

    sums_fn = make_bpb_sums(training.graphdef, tok.token_bytes(), training.mesh, training.rules)
    try:
        core_eval = training_evaluator(cfg, training.graphdef, tok, training.mesh, training.rules)
    except ValueError as err:  # a cap beyond the packaged subset's 500, or too small for 10-shot tasks
        raise SystemExit(f"error: train.core_max_per_task={cfg.train.core_max_per_task}: {err}") from None
    stop = StopRequest()
    lrm = lambda step: float(lr_multiplier(step, num_iterations, cfg.train.warmup_ratio, cfg.train.warmdown_ratio,
                                           cfg.train.final_lr_frac))
    smooth_loss, val_bpb, timed_steps, timed_s = 0.0, meta.get("val_bpb"), 0, 0.0
    step = start
    wandb_run = start_wandb(cfg)

    def save(force: bool):
        meta.update(step=step, val_bpb=val_bpb, num_iterations=num_iterations)
        checkpointer.save(step, params, opt_state, loader.get_state(), cfg.to_dict(), dict(meta), force=force,
                          tokenizer_hash=tok_hash)

    while step < num_iterations:
        t0 = time.perf_counter()
        batch = training.place_rows(next(loader))
        data_dt = time.perf_counter() - t0
        params, opt_state, metrics = training.step(params, opt_state, batch)
        loss = float(metrics["loss"])
        dt = time.perf_counter() - t0
        if not math.isfinite(loss):
            checkpointer.wait()
            print(f"step {step}: loss is {loss}; stopping. The last good checkpoint (step "
                  f"{checkpointer.latest_step()}) is kept in {checkpointer.directory}", file=sys.stderr, flush=True)
            sys.exit(3)
        step += 1
        if step - start > 10:  # the first steps include compilation
            timed_steps, timed_s = timed_steps + 1, timed_s + dt
            meta["train_time_s"] += dt
        smooth_loss = 0.9 * smooth_loss + 0.1 * loss
        debiased = smooth_loss / (1 - 0.9 ** (step - start))
        tps = tokens_per_step / dt
        mfu = hardware.mfu(flops_per_token, tps, jax.device_count())
        eta = (num_iterations - step) * (timed_s / timed_steps) if timed_steps else None
        if jax.process_index() == 0:
            print(f"step {step:05d}/{num_iterations} | loss {debiased:.4f} | lrm {lrm(step - 1):.3f} | "
                  f"{dt * 1000:.0f} ms (data {data_dt * 1000:.0f}) | {tps:,.0f} tok/s | MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | "
                  f"ETA {'n/a' if eta is None else f'{eta / 60:.1f} min'}", flush=True)
        last = step == num_iterations
        log = {"step": step, "loss": debiased, "lrm": lrm(step - 1), "tokens_per_s": tps, "mfu": mfu}
        if last or (cfg.train.eval_every > 0 and step % cfg.train.eval_every == 0):
            val_bpb = evaluate_bpb(cfg, training, tok, params, sums_fn, "val")
            meta["min_val_bpb"] = min(meta["min_val_bpb"], val_bpb)
            log["val_bpb"] = val_bpb
            print(f"step {step:05d} | val bpb {val_bpb:.4f} (min {meta['min_val_bpb']:.4f})", flush=True)
        if core_eval is not None and (last or (cfg.train.core_every > 0 and step % cfg.train.core_every == 0)):
            core = core_eval(params)
            log["core"] = meta["core"] = core.core
            if jax.process_index() == 0:
                shown = "n/a" if core.core is None else f"{core.core:.4f}"
                print(f"step {step:05d} | CORE {shown} ({len(core.tasks)} tasks{', partial' if core.partial else ''}, "
                      f"{core.examples} examples, {core.seconds:.1f}s)", flush=True)
        if last or (cfg.train.sample_every > 0 and step % cfg.train.sample_every == 0):
            print_samples(training, tok, params)
        if jax.process_index() == 0:
            with open(checkpointer.directory / "metrics.jsonl", "a") as f:
                f.write(json.dumps({**log, "raw_loss": loss}) + "\n")
        if wandb_run is not None:
            wandb_run.log(log, step=step)
        stopping = stop.requested()
        save(force=last or stopping)
        if stopping and not last:
            checkpointer.wait()
            print(f"checkpoint at step {step} saved; run the same command to resume", flush=True)
            checkpointer.close()
            sys.exit(128 + stop.signal)
    checkpointer.wait()
    checkpointer.close()

    tokens_per_s = tokens_per_step * timed_steps / timed_s if timed_s else None
    result = {
        "step": step, "num_iterations": num_iterations, "val_bpb": val_bpb,
        "min_val_bpb": None if math.isinf(meta["min_val_bpb"]) else meta["min_val_bpb"], "core": meta.get("core"),
        "tokens_per_s": tokens_per_s,
        "mfu": None if tokens_per_s is None else hardware.mfu(flops_per_token, tokens_per_s, jax.device_count()),
        "train_time_s": meta["train_time_s"], "num_params": n_params, "flops_per_token": flops_per_token,
        "tokens": step * tokens_per_step, "checkpoint": str(checkpointer.directory),
    }
    if jax.process_index() == 0:
        report.log("Base model training", {k: v for k, v in result.items() if v is not None and k != "checkpoint"},
                   {"config": cfg.name, "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}"})
        print(json.dumps(result))
    return result


def start_wandb(cfg):
    if not cfg.train.wandb_project or jax.process_index() != 0:
        return None
    try:
        import wandb
    except ImportError:
        raise SystemExit("train.wandb_project is set but wandb is not installed: `pip install wandb`") from None
    return wandb.init(project=cfg.train.wandb_project, name=cfg.name, config=cfg.to_dict())


if __name__ == "__main__":
    run(main)
