"""Two processes joined by jax.distributed train like one process with all the devices.

Each worker (tests/multihost_worker.py) owns 2 CPU devices; together they form a 4-device FSDP
mesh through a localhost coordinator. Both must see the whole mesh and report the same losses,
and those losses must match a single process that has all 4 devices locally: sharding across
processes changes where the work runs, not what is computed.
"""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).resolve().parent / "multihost_worker.py"
REPO = WORKER.parent.parent
TIMEOUT_S = 240
DIST_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**dist) -> dict:
    """The caller's environment (PATH etc.) without its own distributed settings, plus `dist`."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update({k: str(v) for k, v in dist.items()})
    return env


def _run_workers(logdir: Path, local_devices: int, envs: list[dict]) -> list[dict]:
    """Run one worker per env concurrently; their JSON results, or fail with every stderr.

    When one worker fails or time runs out the rest are killed: a worker whose peer is gone would
    otherwise wait in a collective. Output goes to files, so a chatty worker cannot fill a pipe.
    """
    logdir.mkdir()
    logs = [(logdir / f"{i}.out", logdir / f"{i}.err") for i in range(len(envs))]
    procs = []
    for env, (out, err) in zip(envs, logs):
        with open(out, "w") as stdout, open(err, "w") as stderr:
            procs.append(subprocess.Popen([sys.executable, str(WORKER), str(local_devices)], env=env, cwd=REPO,
                                          stdout=stdout, stderr=stderr))
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        codes = [p.poll() for p in procs]
        if None not in codes or any(codes):
            break
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    if any(p.returncode for p in procs):
        report = "\n".join(f"--- worker {i} (exit {p.returncode}) stderr:\n{err.read_text()[-4000:]}"
                           for i, (p, (_, err)) in enumerate(zip(procs, logs)))
        pytest.fail(f"workers failed or ran past {TIMEOUT_S} s\n{report}")
    return [json.loads(out.read_text().strip().splitlines()[-1]) for out, _ in logs]


@pytest.mark.slow
def test_two_processes_match_each_other_and_one_process(tmp_path):
    address = f"127.0.0.1:{_free_port()}"
    envs = [_env(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=i) for i in range(2)]
    results = _run_workers(tmp_path / "two", 2, envs)
    assert [r["process_index"] for r in results] == [0, 1]
    for r in results:
        assert (r["process_count"], r["device_count"], r["local_device_count"]) == (2, 4, 2)
    assert results[0]["losses"] == results[1]["losses"]

    (single,) = _run_workers(tmp_path / "one", 4, [_env()])
    assert (single["process_count"], single["device_count"]) == (1, 4)
    np.testing.assert_allclose(results[0]["losses"], single["losses"], rtol=1e-5)
