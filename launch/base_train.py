"""Pretrain the base model: nanochat's base_train on the sharded, jitted step.

    python -m launch.base_train --config=tiny     # bundled corpus, CPU, a few minutes
    python -m launch.base_train --config=d20      # FineWeb-Edu shards, 8xH100

Needs a tokenizer (`python -m launch.tok_train`). Horizon: train.num_iterations, else
train.target_flops, else train.target_param_data_ratio x params. Validation bits per byte at step
0, every train.eval_every steps and at the end on a fixed val slice; CORE every train.core_every
steps and at the end (on train.core_max_per_task examples per task; the bundle as in
launch.base_eval); greedy samples every train.sample_every steps. The loop (nanochat_jax.train.fit)
logs a line per step (and JSON to metrics.jsonl beside the checkpoints), checkpoints every
train.checkpoint_every steps, at the end and on SIGTERM/SIGINT; re-running the same command
resumes exactly. A NaN/inf loss stops the run (exit 3), keeping the last good checkpoint. The last
line is JSON.
"""
import json
import math

import jax

from launch import run
from nanochat_jax import hardware, report, sharding
from nanochat_jax import model as model_lib
from nanochat_jax.checkpoint import Checkpointer, checkpoint_dir, tokenizer_hash
from nanochat_jax.config import config_from_args
from nanochat_jax.data.pretrain import pretrain_loader
from nanochat_jax.evals.bpb import bits_per_byte, make_bpb_sums
from nanochat_jax.evals.core import training_evaluator
from nanochat_jax.loading import run_tokenizer
from nanochat_jax.sampling import sample_texts
from nanochat_jax.train import Hook, PlacedRows, build_training, fit, resume_or_start


def main(argv=None):
    cfg, _ = config_from_args(argv, description=__doc__)
    sharding.initialize_distributed()
    tok = run_tokenizer(cfg)
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
    batches = PlacedRows(training, pretrain_loader(cfg, tok, "train", rows=training.local_rows))
    tok_hash = tokenizer_hash(tok)
    state = resume_or_start(training, checkpointer, batches, tok_hash, lambda: training.init(jax.random.key(cfg.seed)))

    sums_fn = make_bpb_sums(training.graphdef, tok.token_bytes(), training.mesh, training.rules)

    def val_bpb(params, _step):
        with pretrain_loader(cfg, tok, "val", rows=micro // jax.process_count()) as loader:
            bpb = bits_per_byte(sums_fn, params, training.micro_batches(loader, training.eval_batches(cfg.train.eval_tokens)))
        return {"val_bpb": bpb, "min_val_bpb": min(bpb, state.meta.get("min_val_bpb", math.inf))}

    try:
        core_eval = training_evaluator(cfg, training.graphdef, tok, training.mesh, training.rules)
    except ValueError as err:  # a cap beyond the packaged subset's 500, or too small for 10-shot tasks
        raise SystemExit(f"error: train.core_max_per_task={cfg.train.core_max_per_task}: {err}") from None
    def samples(params, _step):
        sample_texts(training.graphdef, params, tok)

    hooks = [Hook("val_bpb", cfg.train.eval_every, val_bpb, at_start=True),
             Hook("samples", cfg.train.sample_every, samples)]
    if core_eval is not None:
        hooks.append(Hook("core", cfg.train.core_every, lambda params, _: {"core": core_eval(params).core}))
    state = fit(training, state, batches, checkpointer, config=cfg, tok_hash=tok_hash, hooks=tuple(hooks),
                wandb_run=start_wandb(cfg))
    checkpointer.close()

    meta, tokens_per_s = state.meta, state.meta.get("tokens_per_s")
    result = {
        "step": state.step, "num_iterations": num_iterations, "val_bpb": meta.get("val_bpb"),
        "min_val_bpb": meta.get("min_val_bpb"), "core": meta.get("core"), "tokens_per_s": tokens_per_s,
        "mfu": None if tokens_per_s is None else hardware.mfu(flops_per_token, tokens_per_s, jax.device_count()),
        "train_time_s": meta["train_time_s"], "num_params": n_params, "flops_per_token": flops_per_token,
        "tokens": state.step * tokens_per_step, "checkpoint": str(checkpointer.directory),
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
