"""The training step: sharded runs equal single-device runs (also when a small total batch takes
fewer rows per device), accumulation equals one big batch, and a small batch can be overfitted."""
import jax
import numpy as np
import pytest

from nanochat_jax import sharding
from nanochat_jax.config import load_config
from nanochat_jax.train import batch_geometry, build_training, horizon

SEQ = 32


def small_config(device_batch_size: int, total_batch_size: int, **mesh):
    c = load_config("tiny")
    c.model.depth = 2
    c.model.vocab_size = 256
    c.model.sequence_len = SEQ
    c.model.n_kv_head = 2  # GQA: 4 query heads share 2 KV heads
    c.train.device_batch_size = device_batch_size
    c.train.total_batch_size = total_batch_size
    c.train.num_iterations = 20
    for axis, size in mesh.items():
        c.mesh[axis] = size
    return c


def run_losses(cfg, devices, steps: int = 4, seed: int = 0):
    """Losses of `steps` training steps on fixed random batches, on a mesh of `devices`."""
    training = build_training(cfg, mesh=sharding.make_mesh(cfg.mesh, devices))
    params, opt_state = training.init(jax.random.key(seed))
    rng = np.random.default_rng(seed)
    accum, micro, seq = training.batch_shape
    losses = []
    for _ in range(steps):
        tokens = rng.integers(0, cfg.model.vocab_size, size=(accum * micro, seq + 1), dtype=np.int32)
        inputs = tokens[:, :-1].reshape(accum, micro, seq)
        targets = tokens[:, 1:].reshape(accum, micro, seq)
        params, opt_state, metrics = training.step(params, opt_state, training.place_batch(inputs, targets))
        losses.append(float(metrics["loss"]))
    return np.array(losses), params


def test_eight_devices_match_one():
    assert jax.device_count() == 8, "conftest.py should give the test process 8 CPU devices"
    # Losses, not parameters, are compared: AdamW with eps=1e-10 turns round-off-sized gradients of
    # rare tokens into full-LR steps, so parameters differ in a few elements by design.
    one, _ = run_losses(small_config(16, 16 * SEQ), jax.devices()[:1])
    # 16 rows per device asked for, but 16 sequences over 8 devices: lowered to 2 rows per device
    fsdp, params_fsdp = run_losses(small_config(16, 16 * SEQ), jax.devices())
    mixed, _ = run_losses(small_config(2, 16 * SEQ, data=2, fsdp=4), jax.devices())
    assert len(set(one.tolist())) == len(one)  # the parameters do change between steps
    np.testing.assert_allclose(fsdp, one, rtol=2e-5)
    np.testing.assert_allclose(mixed, one, rtol=2e-5)
    wte = params_fsdp["wte"]
    assert len(wte.sharding.device_set) == 8 and wte.addressable_shards[0].data.shape[1] == wte.shape[1] // 8


def test_accumulation_matches_one_big_batch():
    # Same 16 sequences per step: one micro-batch of 16, or 4 micro-batches of 4.
    big, _ = run_losses(small_config(16, 16 * SEQ), jax.devices()[:1])
    accumulated, _ = run_losses(small_config(4, 16 * SEQ), jax.devices()[:1])
    np.testing.assert_allclose(accumulated, big, rtol=2e-5)


def test_overfits_one_batch():
    cfg = small_config(8, 8 * SEQ)
    training = build_training(cfg, mesh=sharding.make_mesh(cfg.mesh, jax.devices()[:1]), num_iterations=100)
    params, opt_state = training.init(jax.random.key(0))
    tokens = np.random.default_rng(1).integers(0, 256, size=(1, 8, SEQ + 1), dtype=np.int32)
    batch = training.place_batch(tokens[..., :-1], tokens[..., 1:])
    losses = []
    for _ in range(30):
        params, opt_state, metrics = training.step(params, opt_state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[0] == pytest.approx(np.log(256), rel=1e-3)  # zero LM head: uniform predictions
    assert losses[-1] < 0.1 * losses[0]
    assert all(np.isfinite(losses))


def test_batch_geometry_errors_are_clear():
    cfg = small_config(16, 1000)
    with pytest.raises(ValueError, match="not a multiple"):
        batch_geometry(cfg.train, SEQ, 1)
    assert batch_geometry(small_config(4, 64 * SEQ).train, SEQ, 2) == (8, 4)
    with pytest.raises(ValueError, match="smaller than one micro-batch"):  # 4 sequences cannot fill 8 shards
        batch_geometry(small_config(16, 4 * SEQ).train, SEQ, 8)


def test_tiny_on_eight_devices_takes_fewer_rows_per_device(capsys):
    # tiny asks for 4,096 tokens per step with 16 rows of 256 per device: 8 devices would need 32,768.
    cfg = load_config("tiny")
    training = build_training(cfg, mesh=sharding.make_mesh(cfg.mesh, jax.devices()))
    assert training.batch_shape == (1, 16, 256)  # 4,096 tokens: 16 sequences, 2 on each device
    assert "using 2 rows per device" in capsys.readouterr().out
    assert training.local_rows == 16


def test_horizon_precedence():
    t = load_config("d20").train
    assert horizon(t, 560_988_160, 3_491_758_080) == 21_400  # ratio 20, as nanochat's d20 run
    t.target_flops = 3.917670e19
    assert horizon(t, 560_988_160, 3_491_758_080) == 21_400
    t.num_iterations = 7
    assert horizon(t, 560_988_160, 3_491_758_080) == 7


def test_pallas_attention_trains_sharded_like_xla():
    """On data 2 x fsdp 2 x tensor 2, the interpreted Pallas kernel (run per shard under
    shard_map) gives the same training losses as the XLA reference attention."""
    def losses(backend):
        cfg = small_config(2, 16 * SEQ, data=2, fsdp=2, tensor=2)
        cfg.model.attention = backend
        return run_losses(cfg, jax.devices(), steps=2)[0]
    np.testing.assert_allclose(losses("pallas"), losses("xla"), rtol=1e-5)
