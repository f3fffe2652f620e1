"""Configs: every named config builds its model; overrides are typed; mistakes fail clearly."""
import subprocess
import sys

import pytest

from nanochat_jax.config import ConfigError, apply_override, available_configs, config_from_args, load_config
from nanochat_jax.model import GPTConfig


def test_named_configs_derive_models_from_depth():
    assert set(available_configs()) >= {"tiny", "d12", "d20", "d26", "d32"}
    for depth in (12, 20, 26, 32):
        m = GPTConfig.from_config(load_config(f"d{depth}").model)
        assert (m.n_layer, m.dim, m.head_dim, m.n_head, m.n_kv_head) == (depth, 64 * depth, 128, depth // 2, depth // 2)
    assert GPTConfig.from_config(load_config("tiny").model).compute_dtype == "float32"  # CPU


def test_overrides_are_typed():
    cfg, _ = config_from_args(["--config=d12", "--config.model.depth=8", "--config.train.matrix_lr=0.01",
                               "--config.train.grad_clip=1", "--config.model.attention=xla"])
    assert cfg.model.depth == 8 and cfg.train.matrix_lr == 0.01 and cfg.train.grad_clip == 1.0
    assert GPTConfig.from_config(cfg.model).dim == 512  # width follows the overridden depth
    apply_override(cfg, "model.dim", "640")  # a placeholder field takes its declared type
    assert cfg.model.dim == 640


@pytest.mark.parametrize("path, value, message", [
    ("model.dept", "8", "did you mean model.depth"),
    ("nonsense", "1", "unknown config key"),
    ("model.depth", "eight", "expected a value of type int"),
    ("train.matrix_lr", "fast", "expected a value of type float"),
])
def test_bad_overrides_fail_clearly(path, value, message):
    with pytest.raises(ConfigError, match=message):
        apply_override(load_config("tiny"), path, value)


def test_unknown_config_name():
    with pytest.raises(ConfigError, match="available: d12, d20"):
        load_config("d21")


def test_launcher_rejects_unknown_key_with_exit_2():
    proc = subprocess.run([sys.executable, "-m", "launch.bench_train", "--config=tiny", "--config.train.lr=1",
                           "--steps=0"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown config key 'train.lr'" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "launch.bench_train", "--config=tiny", "--stesp=3"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "unrecognised argument '--stesp=3'" in proc.stderr
