"""Download FineWeb-Edu pretraining shards (nanochat's, ~100 MB each) into the data directory.

    python -m launch.download -n 8                              # shards 0-7 and the val shard
    python -m launch.download -n 240 -w 8                       # ~24 GB
    python -m launch.download -n 8 --config.data.dir=/data/fwe  # somewhere else

Fetches the first N train shards (at most all 1,822) and always the val shard (`data.val_shard`,
shard_01822.parquet) into `data.dir`, by default $NANOCHAT_BASE_DIR/base_data. `--config` defaults
to d20 here: `tiny` trains on the corpus bundled with the package, which needs no download.
Re-running resumes: whole shards are skipped, partial ones continue where they stopped. The base
URL comes from --base-url, else $NANOCHAT_DATA_URL, else Hugging Face. Progress goes to stderr;
the last stdout line is JSON: {"downloaded": k, "skipped": m, "failed": [names], "dir": path}.
Exits with status 1 when any shard failed, keeping the shards that completed.
"""
import argparse
import json
import sys

from launch import run
from nanochat_jax.config import config_from_args
from nanochat_jax.data.download import default_base_url, download_shards, shard_indices
from nanochat_jax.data.shards import data_dir


def _at_least(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(config="d20")
    parser.add_argument("-n", "--num-shards", type=_at_least(0), default=8,
                        help="train shards to fetch, from shard 0 (the val shard comes too; default 8)")
    parser.add_argument("-w", "--workers", type=_at_least(1), default=4, help="parallel downloads (default 4)")
    parser.add_argument("--base-url", default=default_base_url(),
                        help="where shard_NNNNN.parquet files are (default $NANOCHAT_DATA_URL or Hugging Face)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds without data before an attempt fails")
    parser.add_argument("--attempts", type=_at_least(1), default=5, help="tries per shard (default 5)")
    parser.add_argument("--backoff", type=float, default=2.0,
                        help="seconds before the first retry, doubling after each (default 2)")


def main(argv=None):
    cfg, args = config_from_args(argv, description=__doc__, add_arguments=add_arguments)
    if cfg.data.dir == "demo":
        raise SystemExit("data.dir=demo is the corpus bundled with the package: there is nothing to download. "
                         "FineWeb-Edu goes to $NANOCHAT_BASE_DIR/base_data with --config=d20 (this launcher's "
                         "default), or elsewhere with --config.data.dir=<path>")
    try:
        indices = shard_indices(args.num_shards, cfg.data.val_shard)
    except ValueError as err:
        raise SystemExit(f"data.val_shard: {err}") from None
    directory = data_dir(cfg.data)
    print(f"{len(indices) - 1} train shards and the val shard {cfg.data.val_shard} from {args.base_url} "
          f"to {directory}", flush=True)
    outcome = download_shards(indices, directory, args.base_url, workers=args.workers, timeout=args.timeout,
                              attempts=args.attempts, backoff_s=args.backoff)
    print(f"downloaded {len(outcome.downloaded)}, skipped {len(outcome.skipped)} already complete, "
          f"failed {len(outcome.failed)}", flush=True)
    if outcome.offline is not None:
        print(f"error: {outcome.offline}", file=sys.stderr)
    else:
        for name, why in outcome.failed.items():
            print(f"error: {name}: {why}", file=sys.stderr)
    result = {"downloaded": len(outcome.downloaded), "skipped": len(outcome.skipped),
              "failed": list(outcome.failed), "dir": str(directory)}
    print(json.dumps(result), flush=True)
    if outcome.failed:
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    run(main)
