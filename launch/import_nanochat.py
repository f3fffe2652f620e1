"""Import a nanochat checkpoint and its tokenizer as a checkpoint of this project.

    python -m launch.import_nanochat --from=~/.cache/nanochat --stage=sft      # a nanochat base dir
    python -m launch.import_nanochat --from=<dir of model_<step>.pt> --tokenizer=<dir of tokenizer.pkl>

Reads `model_<step>.pt` + `meta_<step>.json` (latest step unless --step; in a base dir, the
stage's largest d<depth> model) and `tokenizer/tokenizer.pkl`, without torch and without running
code from the files, and writes `$NANOCHAT_BASE_DIR/checkpoints/<stage>/<tag>/` with the tokenizer
beside it: every launcher that takes a stage (`-i/--source`) then uses it. Later nanochat
architectures are refused with the keys they add. Last line: JSON summary.
"""
import argparse
import json
import sys
import time

from launch import run
from nanochat_jax.checkpoint import STAGES
from nanochat_jax.interop.nanochat import import_checkpoint


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", required=True, help="nanochat base dir or checkpoint dir")
    parser.add_argument("--stage", default="base", choices=STAGES, help="nanochat stage to read, and ours to write")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--tag", default=None, help="our run tag (default: nanochat's, e.g. d20)")
    parser.add_argument("--tokenizer", default=None, help="dir of tokenizer.pkl (default: <base dir>/tokenizer)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        result = import_checkpoint(args.source, args.stage, args.step, args.tag, args.tokenizer)
    except (ValueError, FileExistsError) as err:  # unsafe, corrupt or incompatible files, or a taken tag
        sys.exit(f"error: {err}")
    result["seconds"] = round(time.perf_counter() - start, 2)
    print(f"imported {args.source} step {result['step']} as {result['directory']}", flush=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    run(main)
