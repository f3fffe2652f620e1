"""Naive greedy generation without a KV cache: the reference the cached engine is tested against,
and what base training uses to print samples.

All prompts are right-padded into one (rows, prompt + new tokens) array; each step runs the full
causal forward pass and appends each row's argmax at its own position. Padding after a row's
position cannot influence it (attention is causal), so the result equals generating each prompt
alone. One compilation per (rows, length).
"""
import functools

import jax
import jax.numpy as jnp

from nanochat_jax import model as model_lib


@functools.partial(jax.jit, static_argnums=(0,))
def _greedy_step(graphdef, params, tokens, lengths):
    logits = model_lib.forward(graphdef, params, tokens)  # (rows, L, vocab)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    next_token = jnp.argmax(last, axis=-1).astype(tokens.dtype)
    tokens = tokens.at[jnp.arange(tokens.shape[0]), lengths].set(next_token)
    return tokens, lengths + 1


def greedy_generate(graphdef, params, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations (new tokens only) of each prompt."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts) + max_new_tokens
    tokens = jnp.array([p + [0] * (width - len(p)) for p in prompts], jnp.int32)
    lengths = jnp.array([len(p) for p in prompts], jnp.int32)
    for _ in range(max_new_tokens):
        tokens, lengths = _greedy_step(graphdef, params, tokens, lengths)
    tokens = jax.device_get(tokens)
    return [tokens[i, len(p):len(p) + max_new_tokens].tolist() for i, p in enumerate(prompts)]


SAMPLE_PROMPTS = (  # nanochat's, printed during and after base training
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
)


def sample_texts(graphdef, params, tokenizer, prompts=SAMPLE_PROMPTS, max_new_tokens: int = 16) -> list[str]:
    """Each prompt followed by its greedy continuation (after BOS), printed by process 0."""
    encoded = [tokenizer.encode(p, prepend="<|bos|>") for p in prompts]
    outputs = greedy_generate(graphdef, params, encoded, max_new_tokens=max_new_tokens)
    texts = [p + tokenizer.decode(out) for p, out in zip(prompts, outputs)]
    if jax.process_index() == 0:
        for text in texts:
            print(f"  sample: {text!r}", flush=True)
    return texts
