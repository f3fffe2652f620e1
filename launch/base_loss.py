"""Bits per byte of a trained base model on train and val, and its greedy samples.

    python -m launch.base_loss --config=tiny [--step=N]

Loads the parameters (no optimizer state) of the latest (or given) checkpoint of
`python -m launch.base_train` with the same config, evaluates train.eval_tokens tokens of each
split, and prints nanochat's seven samples. Last line: JSON with train_bpb and val_bpb.
"""
import json

import jax

from launch import run
from launch.base_train import evaluate_bpb, load_tokenizer, print_samples
from nanochat_jax import report, sharding
from nanochat_jax.checkpoint import checkpoint_dir, load_params
from nanochat_jax.config import config_from_args
from nanochat_jax.evals.bpb import make_bpb_sums
from nanochat_jax.train import build_training


def add_arguments(parser):
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")


def main(argv=None):
    cfg, args = config_from_args(argv, description=__doc__, add_arguments=add_arguments)
    sharding.initialize_distributed()
    tok = load_tokenizer(cfg)
    training = build_training(cfg, num_iterations=1)
    params_target, _ = training.abstract_state()
    directory = checkpoint_dir("base", cfg.name)
    params, meta = load_params(directory, args.step, params_target=params_target)
    print(f"loaded step {meta.get('step')} from {directory}", flush=True)
    sums_fn = make_bpb_sums(training.graphdef, tok.token_bytes(), training.mesh, training.rules)
    result = {"step": meta.get("step")}
    for split in ("train", "val"):
        result[f"{split}_bpb"] = evaluate_bpb(cfg, training, tok, params, sums_fn, split)
        print(f"{split} bpb: {result[f'{split}_bpb']:.4f}", flush=True)
    samples = print_samples(training, tok, params)
    if jax.process_index() == 0:
        report.log("Base model loss", result, "Samples:\n\n" + "\n".join(f"- {s!r}" for s in samples))
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    run(main)
