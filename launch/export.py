"""Export a checkpoint of this project for the PyTorch world.

    python -m launch.export --source=sft --format=hf --out=DIR         # transformers' NanoChat
    python -m launch.export --source=base --format=nanochat --out=DIR  # a nanochat base dir

`hf` writes model.safetensors, config.json and (for nanochat's tiktoken vocabulary) tokenizer.json,
tokenizer_config.json with the chat template: `AutoModelForCausalLM.from_pretrained(DIR)` loads it.
`nanochat` writes `<stage>_checkpoints/d<depth>/model_<step>.pt` + meta and `tokenizer/` so that
nanochat's scripts load it (its tokenizer must be tiktoken, as an imported model's is). A model
the target cannot compute exactly is refused. Last line: JSON summary.
"""
import argparse
import json
import sys

from launch import run
from nanochat_jax.checkpoint import STAGES
from nanochat_jax.interop import hf, nanochat
from nanochat_jax.loading import load_model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", "--source", default="sft", choices=STAGES)
    parser.add_argument("-g", "--tag", default=None, help="run tag (default: the most recent of the stage)")
    parser.add_argument("-s", "--step", type=int, default=None)
    parser.add_argument("--format", required=True, choices=("hf", "nanochat"))
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args(argv)
    loaded = load_model(args.source, args.step, tag=args.tag)
    try:
        if args.format == "hf":
            result = hf.export(loaded, args.out)
        else:
            result = {"directory": str(nanochat.export_checkpoint(loaded, args.out, args.source))}
    except nanochat.IncompatibleCheckpoint as err:
        sys.exit(f"error: cannot export to {args.format}: {err}")
    result.update(source=str(loaded.directory), step=loaded.step, format=args.format, out=args.out)
    print(f"exported {loaded.directory} step {loaded.step} to {args.out} ({args.format})", flush=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    run(main)
