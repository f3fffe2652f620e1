"""The training step: one jitted pure function (params, opt_state, batch) -> (params, opt_state, metrics).

A batch is (inputs, targets[, weights]), each (accum_steps, global_micro_batch, seq). The step
scans over the micro-batches, sums their gradients of the step's mean loss over supervised tokens
(see `make_train_step`), applies the optimizer, and donates the old parameters and optimizer
state so their memory is reused. Base, mid, SFT and RL training all drive this same step.
"""
import dataclasses
import json
import math
import signal
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from nanochat_jax import hardware, optim, sharding
from nanochat_jax import model as model_lib


def batch_geometry(train_cfg, sequence_len: int, batch_shards: int) -> tuple[int, int]:
    """(micro-batches per step, rows per device in each) so that each step sees `total_batch_size` tokens.

    A total below one micro-batch over all devices (tiny's 16 x 256 tokens on 8 devices) takes fewer
    rows per device rather than stopping: the step keeps the tokens the config asks for."""
    total, rows = train_cfg.total_batch_size, train_cfg.device_batch_size
    per_row = sequence_len * batch_shards
    if total < rows * per_row:
        if total % per_row:
            raise ValueError(f"total_batch_size {total} is smaller than one micro-batch and not a multiple of "
                             f"sequence_len {sequence_len} x {batch_shards} batch shards = {per_row}")
        rows = total // per_row
    if total % (rows * per_row):
        raise ValueError(f"total_batch_size {total} is not a multiple of device_batch_size {rows} x sequence_len "
                         f"{sequence_len} x {batch_shards} batch shards = {rows * per_row}")
    return total // (rows * per_row), rows


def horizon(train_cfg, n_params: int, flops_per_token: int) -> int:
    """Number of optimizer steps: num_iterations, else target FLOPs, else the param:data ratio."""
    t = train_cfg
    if t.num_iterations > 0:
        return int(t.num_iterations)
    if t.target_flops > 0:
        return max(1, round(t.target_flops / (flops_per_token * t.total_batch_size)))
    if t.target_param_data_ratio > 0:
        return max(1, int(t.target_param_data_ratio * n_params // t.total_batch_size))
    raise ValueError("set one of train.num_iterations, train.target_flops, train.target_param_data_ratio")


@dataclasses.dataclass
class Training:
    """Everything a loop needs: the model's graphdef, placements, the optimizer and the step."""
    model_cfg: model_lib.GPTConfig
    graphdef: object
    mesh: jax.sharding.Mesh
    rules: dict
    tx: optax.GradientTransformation
    param_shardings: object
    opt_shardings: object
    batch_sharding: NamedSharding
    batch_shape: tuple[int, int, int]  # (accum_steps, global micro-batch, seq) of inputs and targets
    num_iterations: int
    step: object  # jitted (params, opt_state, (inputs, targets)) -> (params, opt_state, metrics)

    def init(self, key):
        """Fresh parameters and optimizer state, created directly in their shardings."""
        params = model_lib.init_params(self.model_cfg, key, self.param_shardings)
        opt_state = jax.jit(self.tx.init, out_shardings=self.opt_shardings)(params)
        return params, opt_state

    def start_from(self, params):
        """A fresh optimizer for given parameters (the previous stage's), placed as training wants."""
        params = jax.device_put(params, self.param_shardings)
        opt_state = jax.jit(self.tx.init, out_shardings=self.opt_shardings)(params)
        return params, opt_state

    def abstract_state(self):
        """Shapes, dtypes and shardings of (params, opt_state): restore targets for checkpoints."""
        params = jax.eval_shape(lambda: model_lib.init_params(self.model_cfg, jax.random.key(0)))
        opt_state = jax.eval_shape(self.tx.init, params)
        attach = lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
        return (jax.tree.map(attach, params, self.param_shardings),
                jax.tree.map(attach, opt_state, self.opt_shardings))

    def place_rows(self, rows):
        """This process's (accum * local micro rows, seq + 1) token rows -> placed (inputs, targets).

        Each process passes only the rows it read; together they form the global batch."""
        accum, micro, seq = self.batch_shape
        local = rows.reshape(accum, -1, seq + 1)
        global_shape = (accum, micro, seq)
        return (sharding.put_local_batch(local[..., :-1], self.batch_sharding, global_shape),
                sharding.put_local_batch(local[..., 1:], self.batch_sharding, global_shape))

    @property
    def micro_sharding(self) -> NamedSharding:
        """Sharding of one (batch, seq) micro-batch, as evaluation feeds them."""
        return sharding.batch_sharding(self.mesh, self.rules, ndim=2, batch_dim=0)

    @property
    def local_rows(self) -> int:
        """Rows of seq + 1 tokens this process reads per optimizer step."""
        accum, micro, _ = self.batch_shape
        return accum * micro // jax.process_count()

    def micro_batches(self, rows, limit: int):
        """Up to `limit` placed (inputs, targets) micro-batches from an iterator of this process's
        (local micro rows, seq + 1) token rows, as evaluation feeds them."""
        one_micro = self.batch_shape[1:]
        for _ in range(limit):
            chunk = next(rows, None)
            if chunk is None:
                return
            yield (sharding.put_local_batch(chunk[:, :-1], self.micro_sharding, one_micro),
                   sharding.put_local_batch(chunk[:, 1:], self.micro_sharding, one_micro))

    def eval_batches(self, tokens: int) -> int:
        """Micro-batches that hold `tokens` tokens (at least one)."""
        _, micro, seq = self.batch_shape
        return max(1, tokens // (micro * seq))

    def place_batch(self, inputs, targets):
        """Put a global (accum, batch, seq) host batch on the mesh (each process keeps its part)."""
        return (sharding.put_global_batch(inputs, self.batch_sharding),
                sharding.put_global_batch(targets, self.batch_sharding))


def optimizer_shardings(tx, param_shapes, param_shardings, mesh):
    """Optimizer state laid out like the parameters it tracks; scalars (counts) replicated.

    A state leaf tracks a parameter when its tree path ends with that parameter's path (optax
    nests moments as `...mu['blocks'][0]...`) and the shapes agree.
    """
    by_path = {jax.tree_util.keystr(path): (shape.shape, sh) for (path, shape), sh in zip(
        jax.tree_util.tree_leaves_with_path(param_shapes), jax.tree.leaves(param_shardings))}
    replicated = NamedSharding(mesh, P())

    def place(path, leaf):
        key = jax.tree_util.keystr(path)
        for param_key, (shape, sh) in by_path.items():
            if key.endswith(param_key) and leaf.shape == shape:
                return sh
        return replicated

    return jax.tree_util.tree_map_with_path(place, jax.eval_shape(tx.init, param_shapes))


def build_training(cfg, mesh=None, num_iterations: int | None = None) -> Training:
    model_cfg = model_lib.GPTConfig.from_config(cfg.model)
    mesh = sharding.make_mesh(cfg.mesh) if mesh is None else mesh
    rules = sharding.parse_rules(cfg.mesh.rules)
    graphdef, shapes, logical = model_lib.abstract_model(model_cfg)
    param_shardings = sharding.named_shardings(logical, shapes, mesh, rules)
    if num_iterations is None:
        num_iterations = horizon(cfg.train, model_lib.num_params(model_cfg), model_lib.flops_per_token(model_cfg))
    tx = optim.build_optimizer(cfg.train, model_cfg.dim, num_iterations)
    opt_shardings = optimizer_shardings(tx, shapes, param_shardings, mesh)
    shards = sharding.batch_shards(mesh, rules)
    accum, rows = batch_geometry(cfg.train, model_cfg.sequence_len, shards)
    if rows != cfg.train.device_batch_size and jax.process_index() == 0:
        print(f"total_batch_size {cfg.train.total_batch_size:,} is less than device_batch_size "
              f"{cfg.train.device_batch_size} x sequence_len {model_cfg.sequence_len} x {shards} batch shards: "
              f"using {rows} rows per device", flush=True)
    batch_sharding = sharding.batch_sharding(mesh, rules, ndim=3, batch_dim=1)
    step = make_train_step(graphdef, tx, mesh, rules, param_shardings, opt_shardings, batch_sharding)
    batch_shape = (accum, rows * shards, model_cfg.sequence_len)
    return Training(model_cfg, graphdef, mesh, rules, tx, param_shardings, opt_shardings, batch_sharding,
                    batch_shape, num_iterations, step)


def make_train_step(graphdef, tx, mesh, rules, param_shardings, opt_shardings, batch_sharding):
    """The jitted step. Its batch is (inputs, targets) or (inputs, targets, weights), each
    (accum, batch, seq); targets < 0 are ignored.

    Without weights the loss is the mean cross-entropy over every supervised token of the step:
    the sum over all micro-batches divided by their total count, so a micro-batch with few or no
    supervised tokens (SFT rows are mostly user text) weighs by its tokens, never NaN, and a step
    with none at all has loss 0 and no update beyond weight decay. With weights (RL's
    per-token advantages, already normalised by the caller) the loss is the plain weighted sum.
    """
    def step(params, opt_state, batch):
        inputs, targets, *weights = batch
        if weights:
            norm = jnp.ones([], jnp.float32)
        else:
            norm = jnp.maximum(jnp.sum(targets >= 0), 1).astype(jnp.float32)
        with sharding.activation_rules(mesh, rules):
            loss_and_grad = jax.value_and_grad(lambda p, *xs: model_lib.summed_loss_fn(graphdef, p, *xs) / norm)

            def micro_step(carry, xs):
                loss_sum, grad_sum = carry
                loss, grads = loss_and_grad(params, *xs)
                return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            (loss, grads), _ = jax.lax.scan(micro_step, (jnp.zeros([], jnp.float32), zeros), batch)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "tokens": jnp.sum(targets >= 0)}
        return params, opt_state, metrics

    return jax.jit(step, in_shardings=(param_shardings, opt_shardings, batch_sharding),
                   out_shardings=(param_shardings, opt_shardings, None), donate_argnums=(0, 1))


# ---- the one training loop ---------------------------------------------------------------------

class StopRequest:
    """SIGTERM/SIGINT ask the loop to checkpoint and exit at the end of the current step.

    On several hosts the signal may reach the processes at different steps, and a checkpoint is
    a collective: so the processes agree on the flag every step (one tiny all-gather) and all
    stop at the same step."""

    def __init__(self):
        self.signal = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, _frame):
        if self.signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\nreceived {signal.Signals(signum).name}: saving a checkpoint after this step", flush=True)

    def requested(self) -> bool:
        if jax.process_count() == 1:
            return self.signal is not None
        flags = multihost_utils.process_allgather(np.int32(self.signal or 0))
        self.signal = self.signal or int(np.max(flags)) or None
        return self.signal is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclasses.dataclass
class Hook:
    """An evaluation (or sampling) the loop runs with the current parameters: `fn(params, step)`
    returns figures to log, or None. It runs every `every` steps (<= 0: only at the end), at the
    last step, and at step 0 of a fresh run when `at_start` (nanochat validates before training)."""
    name: str
    every: int
    fn: Callable
    at_start: bool = False

    def due(self, step: int, last: bool, fresh_start: bool) -> bool:
        if step == 0:
            return self.at_start and fresh_start
        return last or (self.every > 0 and step % self.every == 0)


@dataclasses.dataclass
class RunState:
    """Where a run stands: parameters, optimizer state, the step reached and what the run has
    recorded so far (`meta`: best figures, training time; saved in every checkpoint)."""
    params: object
    opt_state: object
    step: int
    meta: dict
    resumed: bool = False


def resume_or_start(training: Training, checkpointer, batches, tok_hash: str, start: Callable[[], tuple],
                    *, tokenizer_dir=None) -> RunState:
    """The latest good checkpoint of this run (parameters, optimizer, data position, meta), or
    `start()` -> (params, opt_state) for a fresh run. A checkpoint trained with another tokenizer
    is refused: its token ids would mean other text."""
    if checkpointer.latest_step() is None:
        params, opt_state = start()
        return RunState(params, opt_state, 0, {"train_time_s": 0.0})
    params_target, opt_target = training.abstract_state()
    restored = checkpointer.restore(params_target=params_target, opt_target=opt_target)
    trained_with = restored["meta"].get("tokenizer_sha256")
    if trained_with not in (None, tok_hash):
        raise SystemExit(f"error: {tokenizer_dir or 'the tokenizer'} is not the one the checkpoint in "
                         f"{checkpointer.directory} was trained with (sha256 {tok_hash[:12]}... vs "
                         f"{trained_with[:12]}...): put that tokenizer back, or train from scratch elsewhere")
    batches.set_state(restored["data"])
    print(f"resumed from step {restored['step']} in {checkpointer.directory}", flush=True)
    return RunState(restored["params"], restored["opt_state"], restored["step"],
                    {"train_time_s": 0.0, **restored["meta"]}, resumed=True)


class PlacedRows:
    """A loader of this process's (local rows, seq + 1) token rows (pretraining's, midtraining's)
    as the placed step batches `fit` takes, checkpointed with the loader's state."""

    def __init__(self, training: Training, loader):
        self.training, self.loader = training, loader

    def __next__(self):
        return self.training.place_rows(next(self.loader))

    def get_state(self) -> dict:
        return self.loader.get_state()

    def set_state(self, state: dict) -> None:
        self.loader.set_state(state)

    def step_figures(self) -> dict:
        """Passes over a chat mixture read so far (its packing buffer included), when the loader counts them."""
        return {"epochs_read": self.loader.progress} if hasattr(self.loader, "progress") else {}


def require_same_horizon(state: RunState, steps: int, directory, settings: str) -> None:
    """A resumed run keeps the number of steps it started with: its schedule was built for it."""
    started = state.meta.get("num_iterations", steps)
    if started != steps:
        raise SystemExit(f"error: the run in {directory} was started for {started} steps and this command asks "
                         f"for {steps}: resume it with the same settings ({settings}), or move that directory "
                         f"away to start over")


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def fit(training: Training, state: RunState, batches, checkpointer, *, config, tok_hash: str,
        hooks: tuple[Hook, ...] = (),
        log_every_step: bool = True, wandb_run=None) -> RunState:
    """Train from `state` to `training.num_iterations`: the loop every stage runs.

    `batches` yields placed step batches (`training.step`'s third argument) and has
    `get_state()` / `set_state()`; a source with `observe(params)` (RL's rollouts) is on-policy:
    it is handed the newest parameters before each batch, and so its batches cannot be prepared
    ahead. Otherwise the next batch is read while the device runs the step (the loss is only read
    back after). Each step appends a JSON line to `<checkpoints>/metrics.jsonl`; hooks run with the
    current parameters; checkpoints go out every `checkpoint.every` steps, at the end and on
    SIGTERM/SIGINT (then the process exits 128 + signal), each with the data position of the
    batch after it, so a rerun resumes exactly. A NaN/inf loss raises NonFiniteLoss, keeping the
    last good checkpoint.
    """
    num_iterations = training.num_iterations
    flops_per_token = model_lib.flops_per_token(training.model_cfg)
    on_policy = hasattr(batches, "observe")
    params, opt_state, step, meta = state.params, state.opt_state, state.step, state.meta
    fresh_start = not state.resumed and step == 0
    lead = jax.process_index() == 0

    def run_hooks(last: bool) -> dict:
        figures = {}
        for hook in hooks:
            if hook.due(step, last, fresh_start):
                got = hook.fn(params, step) or {}
                figures.update(got)
                if lead and got:
                    shown = " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in got.items())
                    print(f"step {step:05d} | {shown}", flush=True)
        meta.update(figures)
        return figures

    if step >= num_iterations:
        print(f"already trained to step {step} of {num_iterations}", flush=True)
    elif fresh_start:  # a resumed run evaluated its step before saving it
        run_hooks(last=False)
    stop = StopRequest()
    smooth, timed_steps, timed_s, timed_tokens = 0.0, 0, 0.0, 0
    batch = None
    try:
        while step < num_iterations:
            t0 = time.perf_counter()
            if on_policy:
                batches.observe(params)
            if batch is None:
                batch = next(batches)
            data_dt = time.perf_counter() - t0
            processed = math.prod(batch[0].shape)  # tokens through the model, supervised or not
            params, opt_state, metrics = training.step(params, opt_state, batch)
            step += 1
            last = step == num_iterations
            state_after = batches.get_state()  # the position a resume at `step` continues from
            batch = None if (on_policy or last) else next(batches)  # while the device computes
            loss = float(metrics["loss"])
            dt = time.perf_counter() - t0
            if not math.isfinite(loss):
                checkpointer.wait()
                raise NonFiniteLoss(f"step {step}: loss is {loss}; stopping. The last good checkpoint (step "
                                    f"{checkpointer.latest_step()}) is kept in {checkpointer.directory}")
            if step - state.step > 10:  # the first steps include compilation
                timed_steps, timed_s, timed_tokens = timed_steps + 1, timed_s + dt, timed_tokens + processed
                meta["train_time_s"] = meta.get("train_time_s", 0.0) + dt
            smooth = 0.9 * smooth + 0.1 * loss
            debiased = smooth / (1 - 0.9 ** (step - state.step))
            tps = processed / dt
            mfu = hardware.mfu(flops_per_token, tps, jax.device_count())
            eta = (num_iterations - step) * (timed_s / timed_steps) if timed_steps else None
            t = config.train  # the schedule the optimizer was built with (build_training)
            lrm = float(optim.lr_multiplier(step - 1, num_iterations, t.warmup_ratio, t.warmdown_ratio, t.final_lr_frac))
            if lead and log_every_step:
                print(f"step {step:05d}/{num_iterations} | loss {debiased:.4f}"
                      f" | lrm {lrm:.3f} | {dt * 1000:.0f} ms (data {data_dt * 1000:.0f}) | "
                      f"{tps:,.0f} tok/s | MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | "
                      f"ETA {'n/a' if eta is None else f'{eta / 60:.1f} min'}", flush=True)
            log = {"step": step, "loss": debiased, "raw_loss": loss, "lrm": lrm,
                   "supervised_tokens": int(metrics["tokens"]),
                   "tokens_per_s": tps, "mfu": mfu, **getattr(batches, "step_figures", dict)()}
            log.update(run_hooks(last))
            if lead:
                with open(checkpointer.directory / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(log) + "\n")
            if wandb_run is not None:
                wandb_run.log(log, step=step)
            stopping = stop.requested()
            meta.update(step=step, num_iterations=num_iterations)
            checkpointer.save(step, params, opt_state, state_after, config, dict(meta), force=last or stopping,
                              tokenizer_hash=tok_hash)
            if stopping and not last:
                checkpointer.wait()
                print(f"checkpoint at step {step} saved; run the same command to resume", flush=True)
                checkpointer.close()
                sys.exit(128 + stop.signal)
    finally:
        stop.restore()
    checkpointer.wait()
    meta["tokens_per_s"] = timed_tokens / timed_s if timed_s else None  # of this invocation, after warm-up
    return RunState(params, opt_state, step, meta, state.resumed)
