"""Two processes joined by jax.distributed train and evaluate like one process with all the devices.

Each worker (tests/multihost_worker.py) owns 2 CPU devices; together they form a 4-device FSDP
mesh through a localhost coordinator. Both must see the whole mesh and report the same losses,
and those losses must match a single process that has all 4 devices locally: sharding across
processes changes where the work runs, not what is computed. Their evaluation is given uneven
data, as hosts may hold it: 3 micro-batches of validation rows on one process and 2 on the other,
a CORE task file on one and not the other. Neither may wait in a collective the other skips: both
finish with the figures of a single process given what they have in common.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from nanochat_jax.data.shards import DEMO_DIR, iter_documents
from nanochat_jax.evals.bundle import PACKAGED_DIR
from nanochat_jax.tokenizer import split_for_training, train_tokenizer

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


def _run_workers(logdir: Path, local_devices: int, envs: list[dict], plan: dict | None = None) -> list[dict]:
    """Run one worker per env concurrently; their JSON results, or fail with every stderr.

    When one worker fails or time runs out the rest are killed: a worker whose peer is gone would
    otherwise wait in a collective. Output goes to files, so a chatty worker cannot fill a pipe.
    """
    logdir.mkdir()
    logs = [(logdir / f"{i}.out", logdir / f"{i}.err") for i in range(len(envs))]
    procs = []
    for env, (out, err) in zip(envs, logs):
        with open(out, "w") as stdout, open(err, "w") as stderr:
            args = [str(local_devices)] + ([json.dumps(plan)] if plan else [])
            procs.append(subprocess.Popen([sys.executable, str(WORKER), *args], env=env, cwd=REPO,
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


def _eval_dir(root: Path) -> Path:
    """A 512-token tokenizer (the workers' vocabulary) and two CORE bundles of three zero-shot tasks
    from the packaged subset: `all`, and `short` without winograd's file."""
    docs = list(iter_documents([DEMO_DIR / "shard_00000.parquet"]))[:200]
    train_tokenizer((p for d in docs for p in split_for_training(d)), 512).save(root / "tokenizer")
    shutil.copytree(PACKAGED_DIR, root / "all")
    spec = yaml.safe_load((root / "all" / "core.yaml").read_text())
    spec["icl_tasks"] = [t for t in spec["icl_tasks"] if t["label"] in ("copa", "winograd", "lambada_openai")]
    (root / "all" / "core.yaml").write_text(yaml.safe_dump(spec))
    shutil.copytree(root / "all", root / "short")
    (winograd,) = [t for t in spec["icl_tasks"] if t["label"] == "winograd"]
    (root / "short" / "eval_data" / winograd["dataset_uri"]).unlink()
    return root


@pytest.mark.slow
def test_two_processes_match_each_other_and_one_process(tmp_path):
    data = _eval_dir(tmp_path / "data")
    address = f"127.0.0.1:{_free_port()}"
    envs = [_env(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=i) for i in range(2)]
    results = _run_workers(tmp_path / "two", 2, envs, {"dir": str(data), "bpb_batches": [3, 2],
                                                       "bundles": ["all", "short"]})
    assert [r["process_index"] for r in results] == [0, 1]
    for r in results:
        assert (r["process_count"], r["device_count"], r["local_device_count"]) == (2, 4, 2)
        assert r["core_tasks"] == ["copa", "lambada_openai"] and "winograd" in r["missing"]
    for key in ("losses", "bpb", "core", "missing"):
        assert results[0][key] == results[1][key], key

    (single,) = _run_workers(tmp_path / "one", 4, [_env()], {"dir": str(data), "bpb_batches": [2],
                                                             "bundles": ["short"]})
    assert (single["process_count"], single["device_count"]) == (1, 4)
    np.testing.assert_allclose(results[0]["losses"], single["losses"], rtol=1e-5)
    np.testing.assert_allclose([results[0]["bpb"], results[0]["core"]], [single["bpb"], single["core"]], rtol=1e-5)
    assert single["core_tasks"] == results[0]["core_tasks"]
