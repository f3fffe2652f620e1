"""Bits per byte on a hand-checkable case, and greedy sampling against one-prompt-at-a-time."""
import math

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax import model as model_lib
from nanochat_jax import sharding
from nanochat_jax.evals.bpb import bits_per_byte, make_bpb_sums
from nanochat_jax.sampling import greedy_generate

CFG = model_lib.GPTConfig(vocab_size=8, n_layer=1, dim=16, n_head=2, n_kv_head=1, sequence_len=8)


def test_bpb_hand_checked():
    """With the zero-initialised LM head every prediction is uniform: ln(8) nats per token.

    Targets: token 3 (2 bytes), 5 (1 byte), special 0 (0 bytes: excluded), ignored -1 (excluded),
    token 7 (4 bytes). bpb = 3 * ln 8 / (ln 2 * 7) = 9/7."""
    graphdef, _, _ = model_lib.abstract_model(CFG)
    params = model_lib.init_params(CFG, jax.random.key(0))
    token_bytes = np.array([0, 1, 1, 2, 1, 1, 1, 4], np.int32)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    sums = make_bpb_sums(graphdef, token_bytes, mesh, {"batch": ("data", "fsdp")})
    inputs = jnp.array([[1, 2, 3, 4, 5]])
    targets = jnp.array([[3, 5, 0, -1, 7]])
    nats, nbytes = sums(params, inputs, targets)
    assert int(nbytes) == 7 and float(nats) == np.float32(3 * math.log(8))
    assert bits_per_byte(sums, params, [(inputs, targets)] * 2) == np.float32(9 / 7)


def test_greedy_batch_equals_one_prompt_at_a_time():
    graphdef, _, _ = model_lib.abstract_model(CFG)
    params = jax.tree.map(lambda p: jax.random.normal(jax.random.key(p.size), p.shape) * 0.5,
                          model_lib.init_params(CFG, jax.random.key(0)))
    prompts = [[1, 2, 3], [4], [5, 6, 7, 1, 2]]
    batched = greedy_generate(graphdef, params, prompts, max_new_tokens=5)
    assert batched == [greedy_generate(graphdef, params, [p], max_new_tokens=5)[0] for p in prompts]
    # and each token is the argmax of the full forward pass over the sequence so far
    seq = list(prompts[2])
    for token in batched[2]:
        logits = model_lib.forward(graphdef, params, jnp.array([seq]))
        assert int(jnp.argmax(logits[0, -1])) == token
        seq.append(token)
