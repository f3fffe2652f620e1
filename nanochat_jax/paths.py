"""Where a run's files live: everything under one base directory.

`$NANOCHAT_BASE_DIR` (default `~/.cache/nanochat_jax`) holds data shards, the tokenizer,
checkpoints per stage, eval results and the report.
"""
import os
from pathlib import Path


def base_dir() -> Path:
    path = Path(os.environ.get("NANOCHAT_BASE_DIR") or Path.home() / ".cache" / "nanochat_jax")
    path.mkdir(parents=True, exist_ok=True)
    return path


def tokenizer_dir() -> Path:
    return base_dir() / "tokenizer"
