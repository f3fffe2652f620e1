"""The training step: one jitted pure function (params, opt_state, batch) -> (params, opt_state, metrics).

A batch is (inputs, targets[, weights]), each (accum_steps, global_micro_batch, seq). The step
scans over the micro-batches, sums their gradients of the step's mean loss over supervised tokens
(see `make_train_step`), applies the optimizer, and donates the old parameters and optimizer
state so their memory is reused. Base, mid, SFT and RL training all drive this same step.
"""
import dataclasses

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from nanochat_jax import model as model_lib
from nanochat_jax import optim, sharding


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
