"""Where task data comes from: a local folder, or public files downloaded once into the cache.

Local: the task's `data_dir=` argument, else `$NANOCHAT_TASK_DATA`: a folder laid out like the
project's shared datasets (`arc/ARC-Easy_test.jsonl`, `mmlu/test.jsonl`, `gsm8k_test.jsonl`,
`humaneval/HumanEval.jsonl.gz`, `words/words3to10.txt`, ...), whose formats differ from Hugging
Face's; each task normalises both. Remote: the public files (Hugging Face dataset parquet,
nanochat's word list), fetched with the shard downloader (retries, resume, atomic rename) into
`$NANOCHAT_BASE_DIR/task_data/<path of the URL>`. `$NANOCHAT_TASKS_URL` replaces the scheme and
host of every URL (a mirror, or a local server in tests); the cache path does not depend on it.
"""
import gzip
import json
import os
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nanochat_jax import paths
from nanochat_jax.data.download import DownloadError, download_file, is_parquet

TASK_DATA_ENV = "NANOCHAT_TASK_DATA"
TASKS_URL_ENV = "NANOCHAT_TASKS_URL"
HF_URL = "https://huggingface.co"
SHUFFLE_SEED = 42


class TaskDataError(RuntimeError):
    """Task data that cannot be found, fetched or read; the message says which file and why."""


def hf_url(repo: str, file: str) -> str:
    return f"{HF_URL}/datasets/{repo}/resolve/main/{file}"


OFFLINE = "offline"
OFFLINE_DIR = Path(__file__).parent / "offline"  # the subsets the package ships (launch/make_offline_tasks.py)


def configured_data_dir(value: str) -> Path | None:
    """A config's `chat.data_dir`: "offline" is the package's own subsets, "" is None (the
    environment's folder, else download), anything else a folder."""
    if value == OFFLINE:
        return OFFLINE_DIR
    return Path(value) if value else None


def local_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The local data folder chosen by the argument or the environment; None means download."""
    chosen = data_dir or os.environ.get(TASK_DATA_ENV)
    return Path(chosen) if chosen else None


def local_file(folder: Path, relative: str) -> Path:
    path = folder / relative
    if not path.is_file():
        raise TaskDataError(f"{path} not found: the local task data folder {folder} (data_dir or "
                            f"${TASK_DATA_ENV}) has no {relative}; unset both to download the data")
    return path


def cache_path(url: str) -> Path:
    return paths.base_dir() / "task_data" / urlsplit(url).path.lstrip("/")


def fetch(url: str) -> Path:
    """The cached copy of `url`, downloaded first if absent (a file with its final name is whole)."""
    dest = cache_path(url)
    if dest.is_file():
        return dest
    mirror = os.environ.get(TASKS_URL_ENV)
    source = mirror.rstrip("/") + urlsplit(url).path if mirror else url
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        download_file(source, dest, verify=is_parquet if dest.suffix == ".parquet" else None)
    except DownloadError as err:
        if err.offline:
            raise TaskDataError(
                f"cannot reach {source}: is this machine offline? Point ${TASK_DATA_ENV} (or the "
                f"task's data_dir) at a folder of local copies, or ${TASKS_URL_ENV} at a mirror") from err
        raise TaskDataError(str(err)) from err
    return dest


def read_jsonl(path: Path):
    """(line number, JSON value) for each non-blank line (gzip when the name ends in .gz)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise TaskDataError(f"{path}, line {number}: not valid JSON ({err})") from None


class Rows(Sequence):
    """A dataset's rows as dicts, in the order nanochat sees them after `load_dataset(...)
    .shuffle(seed=42)`: Hugging Face's shuffle is numpy's `default_rng(seed).permutation`, so the
    same files give nanochat's order (and slices such as MMLU's stop=5200 the same problems).
    Parquet rows stay in an Arrow table until asked for (SmolTalk is 460K conversations)."""

    def __init__(self, rows: pa.Table | list[dict]):
        self._rows = rows
        self._order = np.random.default_rng(SHUFFLE_SEED).permutation(len(rows))

    def __len__(self) -> int:
        return len(self._order)

    def __getitem__(self, index: int) -> dict:
        row = int(self._order[index])
        if isinstance(self._rows, pa.Table):
            return self._rows.slice(row, 1).to_pylist()[0]
        return self._rows[row]


def load_rows(data_dir, local: str, remote: list[str], columns: list[str] | None = None) -> Rows:
    """Rows from the local folder's jsonl file `local` if a folder is chosen, else from the
    downloaded parquet files `remote`, concatenated in order."""
    folder = local_dir(data_dir)
    if folder is not None:
        return Rows([row for _, row in read_jsonl(local_file(folder, local))])
    return Rows(pa.concat_tables(pq.read_table(fetch(url), columns=columns) for url in remote))
