"""Checkpoints of a run through Orbax: sharded arrays plus small JSON items, restorable anywhere.

A checkpoint is one step directory with five items: `params` and `opt_state` (pytrees of sharded
arrays; every process writes only its own shards), `data` (the data iterator's state), `config`
(the run's config as a dict) and `meta` (run metadata: val_bpb, wall time, ...; `step` is added,
and `tokenizer_sha256` when the saver names its tokenizer: see `tokenizer_hash`).
An imported model (`interop.nanochat`) has no `opt_state`: fine-tuning starts a fresh optimizer.
A sixth item, `checksums`, holds an exact checksum of every array: Orbax reads a data file whose
bytes changed without complaint whenever the damaged bytes still decode.

Saves are asynchronous: the arrays are copied to host before `save` returns (so the training step
may donate them), then written in the background into a temporary directory that is renamed into
place when complete; an unfinished save is never listed, and leftovers are removed on start.
Restoring needs abstract targets (`jax.ShapeDtypeStruct`s with a sharding, as from
`Training.abstract_state()` or `abstract_tree`): arrays come back in the target's shardings, which
may differ from the saved ones (an 8-device run loads on 1 device), and in the target's pytree
types (int dict keys, optax namedtuples; without a target Orbax would return "0", "1" keys).

With no step given, restore takes the newest usable checkpoint: a step that cannot be read or
fails its checksums is reported with a `CorruptCheckpointWarning` and the one before is tried.
"""
import hashlib
import json
import math
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from nanochat_jax import paths
from nanochat_jax.tokenizer_tiktoken import TiktokenTokenizer

STAGES = ("base", "mid", "sft", "rl")


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was asked for."""


class CorruptCheckpointWarning(UserWarning):
    """A checkpoint step could not be restored and was skipped."""


def checkpoint_dir(stage: str, tag: str) -> Path:
    """`$NANOCHAT_BASE_DIR/checkpoints/<stage>/<tag>`, e.g. tag = the config name."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    return paths.base_dir() / "checkpoints" / stage / tag


def abstract_tree(shapes, shardings):
    """Restore target: `shapes` (arrays or ShapeDtypeStructs) placed by `shardings`, which is one
    sharding for every leaf (e.g. a 1-device inference placement) or a matching pytree of them."""
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings), shapes)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def tokenizer_hash(tokenizer) -> str:
    """sha256 of a tokenizer's model, recorded in a checkpoint so that loading can refuse another
    tokenizer of the same vocabulary size (token ids mean nothing with the wrong one). SentencePiece:
    the model bytes, i.e. the `tokenizer.model` file. tiktoken: its pattern, special tokens and
    ranks in a fixed order, so the value does not depend on how the JSON file was written."""
    if isinstance(tokenizer, TiktokenTokenizer):
        enc = tokenizer.encoding
        model = json.dumps([enc._pat_str, sorted(enc._special_tokens.items()),
                            sorted((rank, token.hex()) for token, rank in enc._mergeable_ranks.items())]).encode()
    else:
        model = tokenizer.model_proto
    return hashlib.sha256(model).hexdigest()


# ---- integrity ---------------------------------------------------------------------------------

_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _leaf_checksum(x):
    """Sum of bits * odd position weight, mod 2^32: any single flipped bit or moved element changes
    it, and integer sums are exact in any order, so every sharding gives the same value."""
    bits = jax.lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize]).astype(jnp.uint32)
    index = sum((jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * jnp.uint32(math.prod(x.shape[d + 1:]) % 2**32)
                 for d in range(x.ndim)), jnp.uint32(0))
    return jnp.sum(bits * (index * jnp.uint32(0x9E3779B1) | 1), dtype=jnp.uint32)


_tree_checksums = jax.jit(lambda tree: jax.tree.map(_leaf_checksum, tree))


def checksums(tree) -> dict[str, int]:
    """Checksum of every array leaf by its path, e.g. {"['blocks'][0]['attn']['c_q']['kernel']": ...}."""
    sums = jax.device_get(_tree_checksums(tree))
    return {jax.tree_util.keystr(path): int(v) for path, v in jax.tree_util.tree_leaves_with_path(sums)}


def _verify(restored, items):
    for item in items:
        expected, actual = restored["checksums"].get(item, {}), checksums(restored[item])
        bad = [k for k in expected.keys() | actual.keys() if expected.get(k) != actual.get(k)]
        if bad:
            raise CheckpointError(f"{item}: {len(bad)} arrays do not match their checksums, e.g. {sorted(bad)[0]}")


# ---- reading, with fallback past damaged steps -------------------------------------------------

def _everywhere(ok: bool) -> bool:
    """True only if `ok` on every process, so all processes skip (or keep) the same step."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _short(err: BaseException) -> str:
    """The root cause's first line: Orbax wraps TensorStore's reason in pages of store spec."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"


def _read_step(step_dir: Path, targets: dict) -> dict:
    """The items of one step directory: arrays into their abstract targets, JSON where the target is
    None. Item handlers are used directly because `CheckpointManager.restore` ends in a collective
    barrier: on several hosts, a process whose read failed would leave the others waiting in it."""
    items = {}
    for name, target in targets.items():
        if target is None:
            items[name] = ocp.JsonCheckpointHandler().restore(step_dir / name)
            continue
        handler = ocp.StandardCheckpointHandler()
        try:
            items[name] = handler.restore(step_dir / name, args=ocp.args.StandardRestore(target))
        finally:
            handler.close()
    return items


def _restore_usable(directory: Path, step, saved_steps, targets: dict, on_skipped=None):
    """(step, items) of `step`, or else of the newest saved step that reads and verifies.

    `on_skipped` gets the newer steps that failed, once an older one has been read: a failure of
    every step (say, a target for another model) points at the reader, not the files.
    """
    steps = [step] if step is not None else sorted(saved_steps, reverse=True)
    if not steps:
        raise CheckpointError(f"no checkpoints in {directory}")
    arrays = [name for name, target in targets.items() if target is not None]
    failures = []
    for candidate in steps:
        error = None
        try:
            items = _read_step(directory / str(candidate), targets)
        except Exception as err:  # noqa: BLE001 -- any failure to read a step makes that step unusable
            error = err
        if _everywhere(error is None):
            try:
                _verify(items, arrays)  # the same verdict on every process: the checksums are global
            except CheckpointError as err:
                error = err
            else:
                if on_skipped is not None:
                    for skipped, _ in failures:
                        on_skipped(skipped)
                return candidate, items
        error = error or CheckpointError("another process could not read it")
        if step is not None:
            raise CheckpointError(f"checkpoint step {step} in {directory} is unusable: {_short(error)}") from error
        failures.append((candidate, _short(error)))
        warnings.warn(f"checkpoint step {candidate} in {directory} is corrupt or incomplete, skipping it "
                      f"({_short(error)})", CorruptCheckpointWarning, stacklevel=3)
    raise CheckpointError(f"no usable checkpoint in {directory}:\n  "
                          + "\n  ".join(f"step {s}: {e}" for s, e in failures))


def _jsonable(tree):
    """Plain JSON data: numpy and jax scalars/arrays (a val_bpb straight from a metric) become lists/numbers."""
    return json.loads(json.dumps(tree, default=lambda x: np.asarray(x).tolist()))


class Checkpointer:
    """Periodic asynchronous checkpoints of one run, keeping the newest `keep` (None: all).

    Call `save` every step: it writes at multiples of `every` (None: only when forced, like
    nanochat's save_every=-1). To save on SIGTERM/SIGINT, the signal handler only sets a flag; the
    loop then calls `save(step, ..., force=True)` and `wait()` from its own thread, never from the
    handler (the interrupted code may be inside a save). That is safe with an async save still
    running (it is finished first) and when `step` is already saved (a no-op). On several hosts
    every process must make the same calls at the same step, so such a flag has to be agreed on
    (e.g. all-reduced, as base_train's StopRequest does).
    """

    def __init__(self, directory, *, keep: int | None = 3, every: int | None = 1000):
        self.directory = Path(directory)
        interval = [ocp.checkpoint_managers.FixedIntervalPolicy(every)] if every else []
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=ocp.checkpoint_managers.AnySavePolicy(interval),
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            enable_async_checkpointing=True,
            cleanup_tmp_directories=True,  # half-written saves of a killed run
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, params, opt_state, data_state, config, meta, force: bool = False, *,
             tokenizer_hash: str | None = None) -> bool:
        """Start saving `step` if it is due (or `force`d); True if a save was started.

        `opt_state` None saves no optimizer state (an imported model: fine-tuning starts afresh).
        `tokenizer_hash` (of the tokenizer the model was trained with) goes into meta as `tokenizer_sha256`."""
        # the interval test first: listing the saved steps reads the directory, and this runs every step
        if not (force or self._manager.should_save(step)) or step in self._manager.all_steps():
            return False
        config = config.to_dict() if hasattr(config, "to_dict") else config
        arrays = {"params": params} if opt_state is None else {"params": params, "opt_state": opt_state}
        meta = {**meta, "step": step} | ({} if tokenizer_hash is None else {"tokenizer_sha256": tokenizer_hash})
        return self._manager.save(step, force=True, args=ocp.args.Composite(
            **{name: ocp.args.StandardSave(tree) for name, tree in arrays.items()},
            data=ocp.args.JsonSave(_jsonable(data_state)),
            config=ocp.args.JsonSave(_jsonable(config)),
            meta=ocp.args.JsonSave(_jsonable(meta)),
            checksums=ocp.args.JsonSave({name: checksums(tree) for name, tree in arrays.items()}),
        ))

    def wait(self):
        """Block until the last save is on disk (and raise if it failed)."""
        self._manager.wait_until_finished()

    def close(self):
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore(self, step: int | None = None, *, params_target, opt_target) -> dict:
        """{step, params, opt_state, data, config, meta} of `step`, or of the newest usable step
        (after any save in flight has finished).

        A step skipped as corrupt is renamed to `<step>.corrupt-<time>`: kept for inspection, but
        no longer counted, so the resumed run saves that step number again.
        """
        self.wait()
        targets = {"params": params_target, "opt_state": opt_target, "data": None, "config": None, "meta": None,
                   "checksums": None}
        step, items = _restore_usable(self.directory, step, self._manager.all_steps(), targets,
                                      on_skipped=self._set_aside)
        del items["checksums"]
        return {"step": step, **items}

    def _set_aside(self, step: int):
        if jax.process_index() == 0:
            path = self.directory / str(step)
            path.rename(path.with_name(f"{step}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"nanochat_jax checkpoint set aside {step}")
        self._manager.reload()


def _saved_steps(directory) -> list[int]:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoint directory {directory}")
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    with ocp.CheckpointManager(directory, options=options) as manager:
        return list(manager.all_steps())


def load_params(directory, step: int | None = None, *, params_target) -> tuple[object, dict]:
    """(params, meta) for inference, never reading the optimizer state; falls back like `restore`
    but leaves the directory untouched."""
    targets = {"params": params_target, "meta": None, "checksums": None}
    _, items = _restore_usable(Path(directory), step, _saved_steps(directory), targets)
    return items["params"], items["meta"]


def load_info(directory, step: int | None = None) -> dict:
    """{step, config, meta} of `step` or the newest readable step: what inference needs to build
    the model (and so the params target) before loading weights."""
    step, items = _restore_usable(Path(directory), step, _saved_steps(directory), {"config": None, "meta": None})
    return {"step": step, **items}
