"""Download the pretraining shards (FineWeb-Edu as nanochat packs it) with the standard library.

The corpus is 1,823 parquet shards of ~100 MB, `shard_00000.parquet` .. `shard_01822.parquet`; the
last one is the validation split. Threads fetch them (the work is I/O). Every download is resumable
and atomic: bytes go to `<name>.tmp`, continued with an HTTP Range request after an interruption
when the server honours one, and the file takes its final name (fsync, then `os.replace`) only when
its size matches the server's and it reads as parquet, so a shard with a final name is whole.
"""
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

NUM_SHARDS = 1823
HF_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
CHUNK_BYTES = 1 << 20
RETRYABLE_CLIENT_ERRORS = {408, 429}  # besides every 5xx; other 4xx answers will not change


class DownloadError(RuntimeError):
    """A file that could not be fetched; `offline` when the server could not be reached at all."""

    def __init__(self, url: str, message: str, offline: bool = False):
        super().__init__(message)
        self.url = url
        self.offline = offline


class _Retry(Exception):
    """A failed attempt worth repeating: a short body, a mismatched range, an unreadable file."""


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def shard_index(name: str) -> int:
    match = re.fullmatch(r"shard_(\d{5})\.parquet", name)
    if not match:
        raise ValueError(f"{name!r} is not a shard name like shard_01822.parquet")
    return int(match.group(1))


def shard_url(base_url: str, index: int) -> str:
    return f"{base_url.rstrip('/')}/{shard_name(index)}"


def default_base_url() -> str:
    """$NANOCHAT_DATA_URL (a mirror, or a local server), else Hugging Face."""
    return os.environ.get("NANOCHAT_DATA_URL") or HF_URL


def shard_indices(num_train: int, val_shard: str) -> list[int]:
    """The first `num_train` train shards (at most all of them), then the val shard, always."""
    if num_train < 0:
        raise ValueError(f"the number of train shards must be >= 0, got {num_train}")
    val = shard_index(val_shard)
    return [i for i in range(NUM_SHARDS) if i != val][:num_train] + [val]


def is_parquet(path: Path) -> bool:
    """Whether `path` ends in a readable parquet footer, which a cut-off download lacks."""
    try:
        with pq.ParquetFile(path):
            return True
    except (OSError, pa.ArrowException):
        return False


def _check_stop(stop: threading.Event | None, url: str) -> None:
    if stop is not None and stop.is_set():
        raise DownloadError(url, f"{url}: stopped before it finished")


def _content_range(header: str) -> tuple[int | None, int | None]:
    """(first byte, total size) of a `Content-Range: bytes a-b/total` header; None where absent."""
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", header.strip())
    if not match:
        return None, None
    return int(match.group(1)), None if match.group(2) == "*" else int(match.group(2))


def _fetch(url: str, tmp: Path, timeout: float, chunk_bytes: int, progress, stop) -> None:
    """One attempt: append the rest of `url` to `tmp`, or start it over, and fsync it."""
    offset = tmp.stat().st_size if tmp.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code != 416 or not offset:
            raise
        tmp.unlink()  # as long as the file or longer: not a prefix of it
        raise _Retry(f"{url}: the partial download does not fit the file; starting over") from err
    with response:
        if response.status == 206:
            start, total = _content_range(response.headers.get("Content-Range", ""))
            if start != offset:
                tmp.unlink()
                raise _Retry(f"{url}: asked for bytes from {offset:,}, got them from {start}")
        else:  # the server ignored the Range header: start over
            offset = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length else None
        size = offset
        with open(tmp, "ab" if offset else "wb") as f:
            if progress:
                progress(size, total)
            while chunk := response.read(chunk_bytes):
                _check_stop(stop, url)
                f.write(chunk)
                size += len(chunk)
                if progress:
                    progress(size, total)
            f.flush()
            os.fsync(f.fileno())
    if total is not None and size != total:  # a connection closed early reads as a short body
        raise _Retry(f"{url}: got {size:,} of {total:,} bytes")


def download_file(url: str, dest: Path, *, timeout: float = 30.0, attempts: int = 5,
                  backoff_s: float = 2.0, chunk_bytes: int = CHUNK_BYTES,
                  verify: Callable[[Path], bool] | None = None,
                  progress: Callable[[int, int | None], None] | None = None,
                  stop: threading.Event | None = None) -> None:
    """Fetch `url` to `dest` by way of `<dest>.tmp`, resuming a `.tmp` an earlier run left.

    Up to `attempts` tries, waiting `backoff_s` after the first failure and twice as long after
    each further one (nanochat's 2, 4, 8, 16 s by default); 4xx answers other than 408/429 are
    final at once. `verify(tmp)` must accept the finished bytes before they are renamed.
    `progress(bytes_on_disk, expected_size_or_None)` is called per chunk. Setting `stop` abandons
    the file at the next chunk or wait, keeping the `.tmp` for a later resume.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    wait = stop.wait if stop is not None else time.sleep
    for attempt in range(1, attempts + 1):
        _check_stop(stop, url)
        try:
            _fetch(url, tmp, timeout, chunk_bytes, progress, stop)
            if verify is not None and not verify(tmp):
                tmp.unlink()
                raise _Retry(f"{url}: the downloaded file is unreadable")
            os.replace(tmp, dest)
            return
        except urllib.error.HTTPError as err:
            if err.code < 500 and err.code not in RETRYABLE_CLIENT_ERRORS:
                raise DownloadError(url, f"{url}: HTTP {err.code} {err.reason}") from err
            error = err
        except (_Retry, OSError, HTTPException) as err:
            error = err
        if attempt < attempts:
            wait(backoff_s * 2 ** (attempt - 1))
    # urlopen raises a bare URLError (not an HTTPError) only when it could not connect or send
    if isinstance(error, urllib.error.URLError) and not isinstance(error, urllib.error.HTTPError):
        raise DownloadError(
            url, f"cannot reach {url} ({error.reason}; {attempts} attempts). Is this machine offline? "
            f"Shards already complete are kept and a re-run resumes; to train without downloading, "
            f"use the corpus bundled with the package: --config.data.dir=demo (or --config=tiny)",
            offline=True) from error
    raise DownloadError(url, f"failed to download {url} after {attempts} attempts: {error}") from error


class _Progress:
    """One tqdm bar over the bytes of all shards to fetch, fed from the worker threads.

    Sizes are known only once a shard's download starts, so shards not yet started are counted
    at the mean size of those that have (FineWeb-Edu shards are all about 100 MB)."""

    def __init__(self, num_shards: int, enabled: bool):
        self.num_shards, self.finished = num_shards, 0
        self.done: dict[str, int] = {}
        self.sizes: dict[str, int] = {}
        self.lock = threading.Lock()
        self.bar = tqdm(total=None, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                        desc=f"0/{num_shards} shards", disable=not enabled)

    def update(self, name: str, done: int, total: int | None) -> None:
        with self.lock:
            delta = done - self.done.get(name, 0)
            self.done[name] = done
            if total is not None and self.sizes.get(name) != total:
                self.sizes[name] = total
                known = sum(self.sizes.values())
                self.bar.total = known + (self.num_shards - len(self.sizes)) * known // len(self.sizes)
            self.bar.update(delta)

    def shard_finished(self) -> None:
        with self.lock:
            self.finished += 1
            self.bar.set_description_str(f"{self.finished}/{self.num_shards} shards")

    def close(self) -> None:
        self.bar.close()


@dataclass
class DownloadResult:
    downloaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already complete
    failed: dict[str, str] = field(default_factory=dict)  # shard name -> why
    offline: DownloadError | None = None  # the failure that found the server unreachable and stopped the run


def download_shards(indices: Iterable[int], dest_dir: Path, base_url: str, *, workers: int = 4,
                    timeout: float = 30.0, attempts: int = 5, backoff_s: float = 2.0,
                    chunk_bytes: int = CHUNK_BYTES, show_progress: bool = True) -> DownloadResult:
    """Fetch shards `indices` from `base_url` into `dest_dir` on `workers` threads.

    Shards already readable are skipped; a final-named file that is not (a copy cut off by hand, a
    disk error) is deleted first, so that only whole shards ever carry shard names. The first shard
    that finds the server unreachable stops the run, since the rest would only wait out their
    retries too; every shard left without a file is in `failed`.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    result = DownloadResult()
    todo = []
    for index in indices:
        path = dest_dir / shard_name(index)
        if is_parquet(path):
            result.skipped.append(path.name)
        else:
            path.unlink(missing_ok=True)
            todo.append(index)
    stop = threading.Event()
    progress = _Progress(len(todo), show_progress)

    def fetch(index: int) -> None:
        download_file(shard_url(base_url, index), dest_dir / shard_name(index), timeout=timeout,
                      attempts=attempts, backoff_s=backoff_s, chunk_bytes=chunk_bytes, verify=is_parquet,
                      progress=lambda done, total: progress.update(shard_name(index), done, total),
                      stop=stop)

    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(fetch, index): shard_name(index) for index in todo}
            try:
                for future in as_completed(futures):
                    name = futures[future]
                    try:
                        future.result()
                        result.downloaded.append(name)
                    except DownloadError as err:
                        result.failed[name] = str(err)
                        if err.offline and result.offline is None:
                            result.offline = err
                            stop.set()
                    progress.shard_finished()
            except BaseException:  # Ctrl-C or a bug: let the threads stop at their next chunk
                stop.set()
                raise
    finally:
        progress.close()
    result.downloaded.sort()
    result.failed = dict(sorted(result.failed.items()))
    return result
