"""Mesh shapes, logical-to-mesh rules and the placement of parameters and optimizer state."""
import jax
import pytest
from jax.sharding import PartitionSpec as P

from nanochat_jax import sharding
from nanochat_jax.config import load_config
from nanochat_jax.train import build_training


def mesh_cfg(data=1, fsdp=-1, tensor=1):
    return {"data": data, "fsdp": fsdp, "tensor": tensor}


def test_mesh_shape_fills_the_free_axis():
    assert sharding.mesh_shape(mesh_cfg(), 8) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert sharding.mesh_shape(mesh_cfg(data=2), 8) == {"data": 2, "fsdp": 4, "tensor": 1}
    with pytest.raises(ValueError, match="cannot be split"):
        sharding.mesh_shape(mesh_cfg(data=3), 8)
    with pytest.raises(ValueError, match="at most one"):
        sharding.mesh_shape(mesh_cfg(data=-1), 8)
    with pytest.raises(ValueError, match="needs 4 devices"):
        sharding.mesh_shape(mesh_cfg(data=2, fsdp=2), 8)


def test_rules_map_logical_axes_and_skip_indivisible_dims():
    mesh = sharding.make_mesh(mesh_cfg(data=2, fsdp=2, tensor=2))
    rules = sharding.parse_rules(load_config("tiny").mesh.rules)
    assert sharding.logical_to_spec(("embed", "mlp"), (256, 1024), mesh, rules) == P("fsdp", "tensor")
    assert sharding.logical_to_spec(("vocab", "embed"), (4096, 256), mesh, rules) == P("tensor", "fsdp")
    assert sharding.logical_to_spec(("embed", "mlp"), (255, 1024), mesh, rules) == P(None, "tensor")
    assert sharding.logical_to_spec(("batch", "act_seq"), (8, 16), mesh, rules) == P(("data", "fsdp"), None)
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.parse_rules({"embed": "fsdp,model"})


def test_params_and_optimizer_state_are_fsdp_sharded():
    cfg = load_config("tiny")
    cfg.model.depth = 2  # width 128
    cfg.train.device_batch_size = 2
    cfg.train.total_batch_size = 2 * 8 * cfg.model.sequence_len
    training = build_training(cfg)
    params, opt_state = training.init(jax.random.key(0))
    c_fc = params["blocks"][0]["mlp"]["c_fc"]["kernel"]
    assert c_fc.sharding.spec == P("fsdp", None) and len(c_fc.addressable_shards) == 8
    assert c_fc.shape == (128, 512) and c_fc.addressable_shards[0].data.shape == (128 // 8, 512)
    # every optimizer leaf shaped like a parameter is sharded like it; scalars are replicated
    for leaf in jax.tree.leaves(opt_state):
        if leaf.ndim == 2:
            assert "fsdp" in leaf.sharding.spec, leaf.shape
        else:
            assert leaf.sharding.is_fully_replicated
    assert training.batch_sharding.spec == P(None, "fsdp", None)


def test_distributed_env_is_checked(monkeypatch):
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    assert sharding.initialize_distributed() is False
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
    with pytest.raises(RuntimeError, match="JAX_NUM_PROCESSES"):
        sharding.initialize_distributed()
