"""Pretraining text on disk in nanochat's shard layout: parquet files with one `text` column,
documents in row groups. The validation split is one fixed, named shard; training uses the rest.

`data.dir` in the config selects the shards: `demo` is the public-domain corpus bundled with the
package (17M characters, so `tiny` runs with no network), an empty string means
`$NANOCHAT_BASE_DIR/base_data` (where `launch.download` puts FineWeb-Edu), anything else a path.
"""
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow.parquet as pq

from nanochat_jax import paths

DEMO_DIR = Path(__file__).parent / "demo_corpus"


def data_dir(data_cfg) -> Path:
    if data_cfg.dir == "demo":
        return DEMO_DIR
    return Path(data_cfg.dir) if data_cfg.dir else paths.base_dir() / "base_data"


def list_shards(directory: Path) -> list[Path]:
    shards = sorted(p for p in Path(directory).glob("*.parquet"))
    if not shards:
        raise FileNotFoundError(
            f"no parquet shards in {directory}: download some with `python -m launch.download -n 8`, "
            f"or train on the bundled corpus with --config.data.dir=demo")
    return shards


def split_shards(shards: list[Path], val_shard: str) -> tuple[list[Path], Path]:
    """(train shards, the val shard). The val shard is chosen by name, never by position."""
    val = [p for p in shards if p.name == val_shard]
    if not val:
        raise FileNotFoundError(f"validation shard {val_shard} is not among the {len(shards)} shards in "
                                f"{shards[0].parent}; download it or set data.val_shard")
    return [p for p in shards if p.name != val_shard], val[0]


def shards_for_split(data_cfg, split: str) -> list[Path]:
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    train, val = split_shards(list_shards(data_dir(data_cfg)), data_cfg.val_shard)
    return train if split == "train" else [val]


def iter_documents(shards: Iterable[Path], doc_cap: int = 0) -> Iterator[str]:
    """Every document of the shards in order, read one row group at a time, cut to `doc_cap` chars."""
    for path in shards:
        pf = pq.ParquetFile(path)
        for group in range(pf.num_row_groups):
            for text in pf.read_row_group(group, columns=["text"]).column("text").to_pylist():
                yield text[:doc_cap] if doc_cap else text
