"""One device mesh, logical axis names, and where parameters, optimizer state and batches live.

Every parameter carries logical axis names (`embed`, `vocab`, `heads`, `mlp`); activations get
names at a few points in the forward pass (`batch`, `act_seq`, `act_embed`, ...). The config's
`mesh.rules` map each name to mesh axes, so the same model code runs replicated, FSDP-sharded or
tensor-parallel by changing config only. A dimension that a mesh axis does not divide stays
replicated rather than failing.
"""
import contextlib
import contextvars
import math
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

_active = contextvars.ContextVar("nanochat_jax_sharding", default=None)


def initialize_distributed() -> bool:
    """Join a multi-host run when `JAX_COORDINATOR_ADDRESS` is set; a no-op otherwise.

    Each process sets JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
    JAX_PROCESS_ID, and optionally JAX_LOCAL_DEVICE_IDS ("0,1,..."). After this, jax.devices()
    lists every process's devices and the mesh spans them all.
    """
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not address:
        return False
    missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in os.environ]
    if missing:
        raise RuntimeError(f"JAX_COORDINATOR_ADDRESS is set but {', '.join(missing)} is not")
    local_ids = os.environ.get("JAX_LOCAL_DEVICE_IDS")
    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]),
        local_device_ids=[int(i) for i in local_ids.split(",")] if local_ids else None,
    )
    return True


def mesh_shape(mesh_cfg, num_devices: int) -> dict[str, int]:
    """Axis sizes from the config; one axis may be -1 and takes the devices left over."""
    sizes = {axis: int(mesh_cfg[axis]) for axis in MESH_AXES}
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {free}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"{num_devices} devices cannot be split into mesh {sizes}")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, have {num_devices}")
    return sizes


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    sizes = mesh_shape(mesh_cfg, len(devices))
    grid = np.asarray(devices).reshape([sizes[axis] for axis in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def parse_rules(rules_cfg) -> dict[str, tuple[str, ...]]:
    rules = {}
    for name, text in dict(rules_cfg).items():
        axes = tuple(a for a in str(text).replace(" ", "").split(",") if a)
        unknown = [a for a in axes if a not in MESH_AXES]
        if unknown:
            raise ValueError(f"mesh.rules.{name}: unknown mesh axes {unknown}; mesh axes are {MESH_AXES}")
        rules[name] = axes
    return rules


def logical_to_spec(logical_axes, shape, mesh: Mesh, rules) -> P:
    """PartitionSpec for an array of `shape` whose dims carry `logical_axes` names."""
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {logical_axes} do not match shape {shape}")
    spec, used = [], set()
    for dim, name in zip(shape, logical_axes):
        axes = tuple(a for a in rules.get(name, ()) if mesh.shape[a] > 1 and a not in used)
        size = math.prod(mesh.shape[a] for a in axes)
        if size > 1 and dim % size == 0:
            spec.append(axes[0] if len(axes) == 1 else axes)
            used.update(axes)
        else:
            spec.append(None)
    return P(*spec)


def named_shardings(logical_tree, shape_tree, mesh: Mesh, rules):
    """NamedShardings for a pytree, given a matching pytree of logical-axis tuples."""
    return jax.tree.map(lambda names, x: NamedSharding(mesh, logical_to_spec(names, x.shape, mesh, rules)),
                        logical_tree, shape_tree, is_leaf=lambda n: isinstance(n, tuple))


def batch_sharding(mesh: Mesh, rules, ndim: int = 2, batch_dim: int = 0) -> NamedSharding:
    """Sharding of a (…, batch, seq) array: the batch dim over the batch axes, the rest replicated."""
    spec = [None] * ndim
    axes = tuple(a for a in rules["batch"] if mesh.shape[a] > 1)
    spec[batch_dim] = axes if axes else None
    return NamedSharding(mesh, P(*spec))


def batch_shards(mesh: Mesh, rules) -> int:
    """How many ways the batch dim is split: the global batch must be a multiple of this."""
    return math.prod(mesh.shape[a] for a in rules["batch"])


def put_global_batch(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Place a batch every process holds whole (tests, benchmarks); each process keeps its part."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def put_local_batch(local: np.ndarray, sharding: NamedSharding, global_shape) -> jax.Array:
    """Place a batch of which this process read only its own share (the data pipeline's case)."""
    return jax.make_array_from_process_local_data(sharding, local, global_shape)


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules):
    """Within this context, `constrain` pins activations to the mesh; outside, it does nothing."""
    token = _active.set((mesh, rules))
    try:
        yield
    finally:
        _active.reset(token)


def active_rules():
    """(mesh, rules) inside `activation_rules`, else None."""
    return _active.get()


def constrain(x: jax.Array, logical_axes) -> jax.Array:
    active = _active.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(logical_axes, x.shape, mesh, rules)))
