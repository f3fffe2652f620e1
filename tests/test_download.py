"""Shard downloader: a loopback HTTP server with Range support and injected faults stands in for
Hugging Face (fresh, skip, re-fetch, resume, retry, offline, launcher)."""
import json
import random
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from launch import download as launcher
from nanochat_jax.data.download import (DownloadError, download_file, download_shards, is_parquet,
                                        shard_index, shard_indices, shard_name, shard_url)

INDICES = [0, 1, 2, 1822]
FAST = dict(timeout=5.0, backoff_s=0.001, chunk_bytes=1024)


class Handler(BaseHTTPRequestHandler):
    """GETs of files under `server.root`, honouring `Range: bytes=N-` when `server.ranges`.
    Each request first takes the next entry of `server.faults`: 503 answers that status,
    "abort" sends the headers and half the body, then closes the connection."""

    def do_GET(self):
        server = self.server
        with server.lock:
            server.requests.append((self.path, self.headers.get("Range")))
            fault = server.faults.pop(0) if server.faults else None
        if fault == 503:
            self.send_error(503)
            return
        path = server.root / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        start = int(match.group(1)) if match and server.ranges else 0
        if start >= len(data) > 0:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.end_headers()
            return
        if start:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:len(body) // 2] if fault == "abort" else body)

    def log_message(self, *args):
        pass


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Small parquet shards, incompressible enough to span many 1 KB chunks (~15 KB each)."""
    root = tmp_path_factory.mktemp("source")
    for index in INDICES:
        rng = random.Random(index)
        texts = [f"shard {index} document {j}: " + rng.randbytes(48).hex() for j in range(120)]
        pq.write_table(pa.table({"text": texts}), root / shard_name(index), row_group_size=40)
    return root


@pytest.fixture
def server(source):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.root, httpd.ranges, httpd.faults, httpd.requests = source, True, [], []
    httpd.lock = threading.Lock()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def closed_url():
    """A loopback URL whose port nothing listens on: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def same(a, b) -> bool:
    return a.read_bytes() == b.read_bytes()


def test_names_urls_and_indices():
    assert shard_name(7) == "shard_00007.parquet" and shard_index("shard_01822.parquet") == 1822
    assert shard_url("http://host/data/", 3) == "http://host/data/shard_00003.parquet"
    assert shard_indices(3, "shard_01822.parquet") == [0, 1, 2, 1822]
    assert shard_indices(0, "shard_01822.parquet") == [1822]
    capped = shard_indices(5000, "shard_01822.parquet")
    assert capped == list(range(1823)) and len(set(capped)) == 1823
    assert shard_indices(9, "shard_00008.parquet") == [0, 1, 2, 3, 4, 5, 6, 7, 9, 8]
    with pytest.raises(ValueError, match="not a shard name"):
        shard_indices(1, "val.parquet")


def test_fresh_download_then_rerun_skips(server, source, tmp_path):
    result = download_shards(INDICES, tmp_path, server.url, workers=4, show_progress=False, **FAST)
    names = [shard_name(i) for i in INDICES]
    assert result.downloaded == names and result.skipped == [] and result.failed == {}
    assert all(same(tmp_path / name, source / name) for name in names)
    assert sorted(p.name for p in tmp_path.iterdir()) == names  # no .tmp left behind

    seen = len(server.requests)
    again = download_shards(INDICES, tmp_path, server.url, show_progress=False, **FAST)
    assert again.downloaded == [] and sorted(again.skipped) == names and again.failed == {}
    assert len(server.requests) == seen


def test_corrupt_final_shards_are_fetched_again(server, source, tmp_path):
    good, cut, garbage = (shard_name(i) for i in (0, 1, 2))
    (tmp_path / good).write_bytes((source / good).read_bytes())
    (tmp_path / cut).write_bytes((source / cut).read_bytes()[:5000])
    (tmp_path / garbage).write_bytes(b"not parquet")
    assert not is_parquet(tmp_path / cut) and not is_parquet(tmp_path / garbage)

    result = download_shards([0, 1, 2], tmp_path, server.url, show_progress=False, **FAST)
    assert result.skipped == [good] and result.downloaded == [cut, garbage]
    assert all(same(tmp_path / name, source / name) for name in (good, cut, garbage))


def test_partial_tmp_resumes_with_range(server, source, tmp_path):
    name = shard_name(1)
    data = (source / name).read_bytes()
    (tmp_path / f"{name}.tmp").write_bytes(data[:6000])

    download_file(shard_url(server.url, 1), tmp_path / name, verify=is_parquet, **FAST)
    assert server.requests == [(f"/{name}", "bytes=6000-")]
    assert (tmp_path / name).read_bytes() == data and not (tmp_path / f"{name}.tmp").exists()


def test_server_ignoring_range_restarts_the_file(server, source, tmp_path):
    server.ranges = False
    name = shard_name(2)
    (tmp_path / f"{name}.tmp").write_bytes(b"x" * 3000)  # would corrupt the file if appended to

    download_file(shard_url(server.url, 2), tmp_path / name, verify=is_parquet, **FAST)
    assert server.requests == [(f"/{name}", "bytes=3000-")]
    assert same(tmp_path / name, source / name)


def test_overlong_tmp_is_discarded(server, source, tmp_path):
    name = shard_name(1)
    data = (source / name).read_bytes()
    (tmp_path / f"{name}.tmp").write_bytes(data + b"junk")  # the server answers its Range with 416

    download_file(shard_url(server.url, 1), tmp_path / name, verify=is_parquet, **FAST)
    assert server.requests == [(f"/{name}", f"bytes={len(data) + 4}-"), (f"/{name}", None)]
    assert (tmp_path / name).read_bytes() == data


def test_transient_failures_are_retried_and_resumed(server, source, tmp_path):
    server.faults = [503, "abort", 503]
    name = shard_name(0)
    size = (source / name).stat().st_size

    download_file(shard_url(server.url, 0), tmp_path / name, attempts=5, verify=is_parquet, **FAST)
    assert same(tmp_path / name, source / name)
    ranges = [header for _, header in server.requests]
    assert ranges == [None, None, f"bytes={size // 2}-", f"bytes={size // 2}-"]  # resumed after the abort


def test_persistent_server_errors_give_up(server, tmp_path):
    server.faults = [503] * 3
    with pytest.raises(DownloadError, match="after 3 attempts.*503") as err:
        download_file(shard_url(server.url, 0), tmp_path / shard_name(0), attempts=3, **FAST)
    assert not err.value.offline and len(server.requests) == 3
    assert not (tmp_path / shard_name(0)).exists()


def test_missing_file_is_not_retried(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_file(shard_url(server.url, 5), tmp_path / shard_name(5), attempts=5, **FAST)
    assert len(server.requests) == 1


def test_offline_fails_fast_with_a_clear_message(source, closed_url, tmp_path):
    kept = shard_name(0)
    (tmp_path / kept).write_bytes((source / kept).read_bytes())

    start = time.perf_counter()
    result = download_shards(INDICES, tmp_path, closed_url, workers=2, attempts=3, show_progress=False, **FAST)
    assert time.perf_counter() - start < 5
    assert result.offline is not None and result.offline.offline
    message = str(result.offline)
    assert closed_url in message and "--config.data.dir=demo" in message and "offline" in message
    assert result.skipped == [kept] and result.downloaded == []
    assert list(result.failed) == [shard_name(i) for i in INDICES[1:]]
    assert sorted(p.name for p in tmp_path.glob("*.parquet")) == [kept]  # no final-named partial files
    assert is_parquet(tmp_path / kept)


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_launcher_downloads_to_base_data_and_prints_json(server, source, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setenv("NANOCHAT_DATA_URL", server.url)
    base_data = tmp_path / "base_data"

    first = launcher.main(["-n", "3"])
    out, err = capsys.readouterr()
    assert last_json(out) == first == {"downloaded": 4, "skipped": 0, "failed": [], "dir": str(base_data)}
    assert "4/4 shards" in err  # the progress bar, on stderr

    again = launcher.main(["-n", "3", "-w", "2"])
    assert last_json(capsys.readouterr().out) == again == {**first, "downloaded": 0, "skipped": 4}
    assert all(same(base_data / shard_name(i), source / shard_name(i)) for i in INDICES)


def test_launcher_offline_exits_nonzero(closed_url, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        launcher.main(["-n", "1", f"--config.data.dir={tmp_path}", f"--base-url={closed_url}",
                       "--attempts=2", "--backoff=0.001"])
    assert exit_info.value.code == 1
    out, err = capsys.readouterr()
    assert last_json(out) == {"downloaded": 0, "skipped": 0, "dir": str(tmp_path),
                              "failed": ["shard_00000.parquet", "shard_01822.parquet"]}
    assert closed_url in err and "--config.data.dir=demo" in err


def test_launcher_refuses_the_bundled_corpus(capsys):
    with pytest.raises(SystemExit, match="bundled"):
        launcher.main(["--config=tiny"])
