"""Checkpoints: exact round trips on 8 devices, identical resumed training, retention, fallback
past a corrupt newest checkpoint, and loading weights for inference on another sharding."""
import dataclasses
import gc
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from nanochat_jax import checkpoint as ckpt
from nanochat_jax import model as model_lib
from nanochat_jax import paths, sharding
from nanochat_jax.config import load_config
from nanochat_jax.loading import load_model
from nanochat_jax.tokenizer import train_tokenizer
from nanochat_jax.train import build_training

SEQ = 32

# Reading a corrupt array fails in one of Orbax's concurrent shard reads; the sibling reads it
# abandons fail later and are reported as unraisable exceptions (with TensorStore specs).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(autouse=True)
def _collect_abandoned_reads():
    """Finalize those abandoned reads here, where the warnings are ignored, not in a later test."""
    yield
    gc.collect()


def small_config():
    c = load_config("tiny")
    c.model.depth = 2
    c.model.vocab_size = 256
    c.model.sequence_len = SEQ
    c.train.device_batch_size = 2
    c.train.total_batch_size = 2 * SEQ * 8
    c.train.num_iterations = 20
    return c


def batch(training, i: int):
    tokens = np.random.default_rng(i).integers(0, 256, training.batch_shape[:2] + (SEQ + 1,), dtype=np.int32)
    return training.place_batch(tokens[..., :-1], tokens[..., 1:])


@pytest.fixture(scope="module")
def cfg():
    return small_config()


@pytest.fixture(scope="module")
def training(cfg):
    assert jax.device_count() == 8
    return build_training(cfg, mesh=sharding.make_mesh(cfg.mesh, jax.devices()))


@pytest.fixture(scope="module")
def states(training):
    """Two different (params, opt_state): freshly initialised, and after two steps (the first moves
    only the zero-initialised LM head), so every moment and count is nonzero."""
    fresh = training.init(jax.random.key(0))
    params, opt_state = training.init(jax.random.key(0))
    for i in range(2):
        params, opt_state, _ = training.step(params, opt_state, batch(training, i))
    return fresh, (params, opt_state)


def meta_for(training):
    return {"val_bpb": np.float32(1.25), "wall_time_s": 12.5, "model": dataclasses.asdict(training.model_cfg)}


def save_states(directory, training, cfg, states):
    """Steps 1 and 2 hold the two states."""
    with ckpt.Checkpointer(directory, every=1) as ck:
        for step, (params, opt_state) in enumerate(states, start=1):
            assert ck.save(step, params, opt_state, {"shard": step, "row": 7}, cfg, meta_for(training))


def assert_same_tree(actual, expected):
    """Same pytree structure (dict keys with their types, optax namedtuples), dtypes, shardings, bits."""
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert a.dtype == e.dtype and a.sharding == e.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def array_files(step_dir, item):
    files = sorted(p for p in step_dir.glob(f"{item}/ocdbt.process_*/d/*") if p.is_file())
    assert files, f"no array data files under {step_dir / item}"
    return files


def test_checkpoint_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    assert ckpt.checkpoint_dir("base", "d20") == tmp_path / "checkpoints" / "base" / "d20"
    with pytest.raises(ValueError, match="stages are base, mid, sft, rl"):
        ckpt.checkpoint_dir("pretrain", "d20")


def test_round_trip_is_exact_on_eight_devices(tmp_path, cfg, training, states):
    params, opt_state = states[1]
    assert len(params["wte"].sharding.device_set) == 8 and not params["wte"].sharding.is_fully_replicated
    with ckpt.Checkpointer(tmp_path, every=1) as ck:
        assert ck.save(5, params, opt_state, {"shard": 3, "row": 17}, cfg, meta_for(training))
        params_target, opt_target = training.abstract_state()
        out = ck.restore(params_target=params_target, opt_target=opt_target)
    assert out["step"] == 5
    assert list(out["params"]["blocks"]) == [0, 1]  # int keys, not "0", "1"
    assert_same_tree(out["params"], params)
    assert_same_tree(out["opt_state"], opt_state)
    assert out["data"] == {"shard": 3, "row": 17}
    assert out["config"] == cfg.to_dict()
    assert out["meta"] == {**meta_for(training), "val_bpb": 1.25, "step": 5}


def test_training_resumes_identically(tmp_path, cfg, training):
    params, opt_state = training.init(jax.random.key(1))
    with ckpt.Checkpointer(tmp_path, every=2) as ck:
        for i in range(1, 6):
            params, opt_state, _ = training.step(params, opt_state, batch(training, i))
            ck.save(i, params, opt_state, {"next_batch": i + 1}, cfg, {})  # saves 2 and 4, then donates them
        losses = []
        for i in range(6, 9):
            params, opt_state, metrics = training.step(params, opt_state, batch(training, i))
            losses.append(float(metrics["loss"]))
        ck.wait()
        assert ck.all_steps() == [2, 4]
        params_target, opt_target = training.abstract_state()
        out = ck.restore(params_target=params_target, opt_target=opt_target)
    assert out["step"] == 4 and out["data"] == {"next_batch": 5}
    params, opt_state = out["params"], out["opt_state"]
    params, opt_state, _ = training.step(params, opt_state, batch(training, 5))
    resumed = []
    for i in range(6, 9):
        params, opt_state, metrics = training.step(params, opt_state, batch(training, i))
        resumed.append(float(metrics["loss"]))
    assert resumed == losses


def tiny_state():
    return {"w": jnp.arange(4.0)}, {"count": jnp.zeros([], jnp.int32)}


def test_interval_retention_and_forced_saves(tmp_path):
    params, opt_state = tiny_state()
    with ckpt.Checkpointer(tmp_path, keep=2, every=3) as ck:
        saved = [step for step in range(1, 11) if ck.save(step, params, opt_state, {}, {}, {})]
        assert saved == [3, 6, 9]
        assert ck.save(10, params, opt_state, {}, {}, {}, force=True)  # e.g. on SIGTERM
        assert not ck.save(10, params, opt_state, {}, {}, {}, force=True)  # already saved: a no-op
        ck.wait()
        assert ck.all_steps() == [9, 10] and ck.latest_step() == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["10", "9"]
    with ckpt.Checkpointer(tmp_path / "final_only", every=None) as ck:
        assert not any(ck.save(step, params, opt_state, {}, {}, {}) for step in range(1, 4))
        assert ck.save(3, params, opt_state, {}, {}, {}, force=True) and ck.all_steps() == [3]


def test_unfinished_save_is_not_listed_and_is_cleaned_up(tmp_path):
    params, opt_state = tiny_state()
    with ckpt.Checkpointer(tmp_path, every=1) as ck:
        ck.save(1, params, opt_state, {}, {}, {})
    unfinished = tmp_path / "2.orbax-checkpoint-tmp-1234567"  # what a save killed midway leaves
    (unfinished / "params").mkdir(parents=True)
    (unfinished / "params" / "partial").write_bytes(b"\0" * 10)
    with ckpt.Checkpointer(tmp_path, every=1) as ck:
        assert ck.all_steps() == [1]
        ck.save(3, params, opt_state, {}, {}, {})  # waits for the start-up clean-up
        assert not unfinished.exists()


def truncate_arrays(step_dir):
    for path in array_files(step_dir, "params"):
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)


def delete_optimizer_arrays(step_dir):
    for path in array_files(step_dir, "opt_state"):
        path.unlink()


def flip_bytes(step_dir):
    for path in array_files(step_dir, "params"):
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))


def mix_up_params(step_dir):
    """A valid item of another step (say, a bad copy): readable, only the checksums notice."""
    shutil.rmtree(step_dir / "params")
    shutil.copytree(step_dir.parent / "1" / "params", step_dir / "params")


def delete_metadata(step_dir):
    (step_dir / "params" / "_METADATA").unlink()


def truncate_json(step_dir):
    path = step_dir / "data" / "metadata"
    path.write_text(path.read_text()[:5])


@pytest.mark.parametrize("corrupt, reason", [(truncate_arrays, ""), (delete_optimizer_arrays, ""), (flip_bytes, ""),
                                             (mix_up_params, "params: .* do not match their checksums"),
                                             (delete_metadata, ""), (truncate_json, "")])
def test_corrupt_latest_falls_back_to_previous(tmp_path, cfg, training, states, corrupt, reason):
    save_states(tmp_path, training, cfg, states)
    corrupt(tmp_path / "2")
    params_target, opt_target = training.abstract_state()
    with ckpt.Checkpointer(tmp_path, every=1) as ck:
        with pytest.warns(ckpt.CorruptCheckpointWarning, match=rf"checkpoint step 2 in .* is corrupt.*{reason}"):
            out = ck.restore(params_target=params_target, opt_target=opt_target)
        assert out["step"] == 1 and out["data"] == {"shard": 1, "row": 7}
        assert_same_tree(out["params"], states[0][0])
        assert_same_tree(out["opt_state"], states[0][1])
        # The bad step is set aside, so the resumed run can save step 2 again.
        assert ck.all_steps() == [1] and len(list(tmp_path.glob("2.corrupt-*"))) == 1
        assert ck.save(2, *states[1], {}, cfg, {})


def test_no_usable_checkpoint_is_a_clear_error(tmp_path, cfg, training, states):
    params_target, opt_target = training.abstract_state()
    with ckpt.Checkpointer(tmp_path / "empty") as ck, pytest.raises(ckpt.CheckpointError, match="no checkpoints in"):
        ck.restore(params_target=params_target, opt_target=opt_target)

    save_states(tmp_path / "run", training, cfg, states)
    truncate_arrays(tmp_path / "run" / "1")
    with ckpt.Checkpointer(tmp_path / "run") as ck:
        with pytest.raises(ckpt.CheckpointError, match="step 1 in .* is unusable"):
            ck.restore(1, params_target=params_target, opt_target=opt_target)  # an explicit step: no fallback
        delete_metadata(tmp_path / "run" / "2")
        with pytest.warns(ckpt.CorruptCheckpointWarning), \
                pytest.raises(ckpt.CheckpointError, match=r"no usable checkpoint in .*\n  step 2: .*\n  step 1: "):
            ck.restore(params_target=params_target, opt_target=opt_target)


def test_load_params_on_one_device_without_optimizer_state(tmp_path, cfg, training, states):
    save_states(tmp_path, training, cfg, states)
    shutil.rmtree(tmp_path / "2" / "opt_state")
    info = ckpt.load_info(tmp_path)
    assert info["step"] == 2 and info["meta"]["model"] == dataclasses.asdict(training.model_cfg)
    # What inference does: the model from the saved config, every weight on one device.
    model_cfg = model_lib.GPTConfig.from_config(ConfigDict(info["config"]["model"]))
    _, shapes, _ = model_lib.abstract_model(model_cfg)
    one_device = NamedSharding(sharding.make_mesh(cfg.mesh, jax.devices()[:1]), P())
    params, meta = ckpt.load_params(tmp_path, params_target=ckpt.abstract_tree(shapes, one_device))
    assert meta["step"] == 2
    assert all(leaf.sharding == one_device for leaf in jax.tree.leaves(params))
    for a, e in zip(jax.tree.leaves(params), jax.tree.leaves(states[1][0])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def test_eight_device_checkpoint_resumes_on_one_device(tmp_path, cfg, training, states):
    save_states(tmp_path, training, cfg, states)
    single = build_training(cfg, mesh=sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
    params_target, opt_target = single.abstract_state()
    with ckpt.Checkpointer(tmp_path) as ck:
        out = ck.restore(params_target=params_target, opt_target=opt_target)
    assert out["step"] == 2
    for restored, expected, shardings in ((out["params"], states[1][0], single.param_shardings),
                                          (out["opt_state"], states[1][1], single.opt_shardings)):
        assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(expected)
        for a, e, s in zip(jax.tree.leaves(restored), jax.tree.leaves(expected), jax.tree.leaves(shardings)):
            assert a.sharding == s and len(a.sharding.device_set) == 1
            np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def word_tokenizer(words: list[str]):
    """A small SentencePiece tokenizer (300 tokens) trained on sentences of `words`."""
    sentences = (" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(2000))
    return train_tokenizer(sentences, 300)


def test_a_checkpoint_loads_only_with_the_tokenizer_it_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    ours = word_tokenizer(["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa", "lambda"])
    other = word_tokenizer(["red", "green", "blue", "yellow", "purple", "orange", "violet", "indigo", "cyan"])
    assert other.vocab_size == ours.vocab_size  # the size check alone would let it through
    ours.save(paths.tokenizer_dir())
    model_file = paths.tokenizer_dir() / "tokenizer.model"
    assert ckpt.tokenizer_hash(ours) == hashlib.sha256(model_file.read_bytes()).hexdigest()  # as `sha256sum` says

    cfg = small_config()
    cfg.model.vocab_size = ours.vocab_size
    params = model_lib.init_params(model_lib.GPTConfig.from_config(cfg.model), jax.random.key(0))
    with ckpt.Checkpointer(ckpt.checkpoint_dir("base", "recorded"), every=None) as ck:
        ck.save(3, params, None, {}, cfg, {}, force=True, tokenizer_hash=ckpt.tokenizer_hash(ours))
    with ckpt.Checkpointer(ckpt.checkpoint_dir("base", "unrecorded"), every=None) as ck:
        ck.save(3, params, None, {}, cfg, {}, force=True)  # as saved before hashes were recorded
    assert ckpt.load_info(ckpt.checkpoint_dir("base", "recorded"))["meta"]["tokenizer_sha256"] == \
        ckpt.tokenizer_hash(ours)
    assert load_model("base", tag="recorded").step == 3

    other.save(paths.tokenizer_dir())  # the tokenizer retrained since
    with pytest.raises(ValueError, match=r"tokenizer/tokenizer\.model .* is not the tokenizer the checkpoint "
                                         r".*checkpoints/base/recorded/3 was trained with"):
        load_model("base", tag="recorded")
    assert load_model("base", tag="unrecorded").tokenizer.model_proto == other.model_proto


def multihost_worker(directory: Path):
    """One of two processes (4 CPU devices each, one 8-device mesh) sharing a checkpoint directory.
    Step 2 is damaged in the shards only process 1 reads, so only process 1's read fails."""
    sharding.initialize_distributed()
    cfg = small_config()
    training = build_training(cfg)
    states = [training.init(jax.random.key(seed)) for seed in (1, 2)]
    save_states(directory, training, cfg, states)
    if jax.process_index() == 0:
        for path in (directory / "2" / "params").glob("ocdbt.process_1/d/*"):
            os.truncate(path, path.stat().st_size // 2)
    multihost_utils.sync_global_devices("corrupted")
    params_target, opt_target = training.abstract_state()
    with warnings.catch_warnings(record=True) as caught, ckpt.Checkpointer(directory) as ck:
        warnings.simplefilter("always", ckpt.CorruptCheckpointWarning)
        out = ck.restore(params_target=params_target, opt_target=opt_target)
        steps_after = ck.all_steps()
    print(json.dumps({"step": out["step"], "steps_after": steps_after,
                      "restored": ckpt.checksums(out["params"]) == ckpt.checksums(states[0][0]),
                      "warnings": [str(w.message) for w in caught
                                   if issubclass(w.category, ckpt.CorruptCheckpointWarning)]}), flush=True)


@pytest.mark.slow
def test_two_processes_restore_and_skip_the_same_step(tmp_path):
    """A read that fails on one host only must not leave the other waiting in a collective."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    repo = Path(__file__).resolve().parent.parent
    procs, logs = [], [(tmp_path / f"{i}.out", tmp_path / f"{i}.err") for i in range(2)]
    for i, (out, err) in enumerate(logs):
        env = {**os.environ, "JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
        with open(out, "w") as stdout, open(err, "w") as stderr:
            procs.append(subprocess.Popen([sys.executable, __file__, str(tmp_path / "run")], env=env, cwd=repo,
                                          stdout=stdout, stderr=stderr))
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and any(p.poll() is None for p in procs) and not any(p.poll() for p in procs):
        time.sleep(0.2)
    for p in procs:  # a worker whose peer died would wait in a collective until killed
        if p.poll() is None:
            p.kill()
        p.wait()
    if any(p.returncode for p in procs):
        pytest.fail("\n".join(f"worker {i} exit {p.returncode}:\n{err.read_text()[-3000:]}"
                               for i, (p, (_, err)) in enumerate(zip(procs, logs))))
    results = [json.loads(out.read_text().strip().splitlines()[-1]) for out, _ in logs]
    for r in results:
        assert r["restored"] and r["step"] == 1 and r["steps_after"] == [1]
        assert len(r["warnings"]) == 1 and "checkpoint step 2" in r["warnings"][0]
    assert "another process could not read it" in results[0]["warnings"][0]


if __name__ == "__main__":  # a worker of the test above; the device count must be set before jax starts
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    multihost_worker(Path(sys.argv[1]))
