"""Bits per byte of a trained base model on train and val, and its greedy samples.

    python -m launch.base_loss --config=tiny [--source=base] [--tag=TAG] [--step=N]

Loads the parameters (no optimizer state) of the latest (or given) checkpoint of a stage: by
default the most recent base run (`launch.base_train`, or a model brought in with
`launch.import_nanochat`, whose own tokenizer travels with it). The model is the checkpoint's;
the config gives the data and the mesh. Evaluates train.eval_tokens tokens of each split and
prints nanochat's seven samples. Last line: JSON with train_bpb and val_bpb.
"""
import json

import jax

from launch import run
from nanochat_jax import report, sharding
from nanochat_jax.checkpoint import STAGES
from nanochat_jax.config import config_from_args
from nanochat_jax.data.pretrain import pretrain_loader
from nanochat_jax.evals.bpb import bits_per_byte, make_bpb_sums
from nanochat_jax.loading import open_source
from nanochat_jax.sampling import sample_texts
from nanochat_jax.train import build_training


def add_arguments(parser):
    parser.add_argument("--source", default="base", choices=STAGES, help="checkpoint stage (default: base)")
    parser.add_argument("--tag", default=None, help="run tag (default: the stage's most recent run)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")


def main(argv=None):
    cfg, args = config_from_args(argv, description=__doc__, add_arguments=add_arguments)
    sharding.initialize_distributed()
    source = open_source(cfg, args.source, tag=args.tag, step=args.step)
    cfg, tok = source.config, source.tokenizer
    mesh = sharding.make_mesh(cfg.mesh)
    row_tokens = cfg.model.sequence_len * sharding.batch_shards(mesh, sharding.parse_rules(cfg.mesh.rules))
    if cfg.train.total_batch_size % row_tokens:  # a model of another context than the config trains (an import)
        cfg.train.total_batch_size = cfg.train.device_batch_size * row_tokens  # scoring only needs micro-batches
    training = build_training(cfg, mesh=mesh, num_iterations=1)
    params = source.load_params(training.abstract_state()[0])
    print(f"loaded step {source.step} from {source.directory}", flush=True)
    sums_fn = make_bpb_sums(training.graphdef, tok.token_bytes(), training.mesh, training.rules)
    micro = training.batch_shape[1]
    result = {"step": source.step}
    for split in ("train", "val"):
        with pretrain_loader(cfg, tok, split, rows=micro // jax.process_count(), loop=split == "train") as loader:
            batches = training.micro_batches(loader, training.eval_batches(cfg.train.eval_tokens))
            result[f"{split}_bpb"] = bits_per_byte(sums_fn, params, batches)
        print(f"{split} bpb: {result[f'{split}_bpb']:.4f}", flush=True)
    samples = sample_texts(training.graphdef, params, tok)
    if jax.process_index() == 0:
        report.log("Base model loss", result, "Samples:\n\n" + "\n".join(f"- {s!r}" for s in samples))
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    run(main)
