"""A fixed pool of request slots over one preallocated KV cache, advanced together one token a tick.

Each slot is a row of a (slots, context) cache. A request's prompt is prefilled at batch 1 by the
engine's bucketed prefill and written into the slot's row; then the engine's decode step runs one
token for every row, reading only the cache slots below the furthest row's bucket, and each row's
next token is drawn with that row's own temperature, top-k and top-p. Those live on the device as
(slots,) arrays, set when a request is admitted, so new values never recompile: sampling compiles
once, admission once per prompt bucket, the decode step once per read-length bucket. As in the
engine, a row's draw at step t uses the key (seed, stream, t) (`engine.row_keys`), so a seeded
request gets the same tokens whatever shares the batch with it. Free rows decode a dummy token at
position 0; the next prefill into the row overwrites it, and a row only attends to positions it
has written itself.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax.engine import Engine, row_keys


@dataclasses.dataclass(frozen=True)
class Sampling:
    """One request's sampling: temperature 0 is greedy; top_k 0 and top_p 1 keep every token.
    `stream` tells apart several choices drawn with one seed (OpenAI's `n`)."""
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stream: int = 0


def sample_rows(logits, keys, temperature, top_k, top_p):
    """One token per row of logits (S, V), each row with its own key and parameters (S,): the
    argmax where temperature is 0, else a draw from softmax(logits / temperature) over the row's
    top_k largest logits (all where 0), then over the smallest head of those holding top_p of
    their probability (as Hugging Face and vLLM apply the two). The draw is always taken over the
    whole vocabulary in its own order, the excluded tokens masked out, so an unrestricted row
    draws the same token whether or not a row beside it needed the (skipped otherwise) sort."""
    rows, vocab = logits.shape
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]

    def restrict(scaled):
        order = jnp.argsort(-scaled, axis=-1)
        ranked = jnp.take_along_axis(scaled, order, axis=-1)
        keep = jnp.arange(vocab)[None] < jnp.where(top_k > 0, top_k, vocab)[:, None]
        probs = jax.nn.softmax(jnp.where(keep, ranked, -jnp.inf), axis=-1)
        keep &= (jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]  # the first token is always kept
        return jnp.zeros((rows, vocab), bool).at[jnp.arange(rows)[:, None], order].set(keep)
    restricted = jnp.any(((top_k > 0) | (top_p < 1)) & (temperature > 0))
    keep = jax.lax.cond(restricted, restrict, lambda s: jnp.ones(s.shape, bool), scaled)
    sampled = jax.vmap(jax.random.categorical)(keys, jnp.where(keep, scaled, -jnp.inf))
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


def _sample(rows, logits, steps):
    """Every row's next token from its logits (S, V), drawing step `steps` (S,) of its stream."""
    keys = row_keys(rows["seed"], rows["stream"], steps)
    return sample_rows(logits, keys, rows["temperature"], rows["top_k"], rows["top_p"])


def _set_row(rows, logits, slot, values):
    """Row `slot` takes a new request's sampling `values`; its first token is drawn from the
    prefill logits (1, V) at step 0."""
    rows = {name: rows[name].at[slot].set(values[name]) for name in rows}
    first = _sample({name: jnp.reshape(v, (1,)) for name, v in values.items()}, logits, jnp.zeros(1, jnp.int32))
    return rows, first[0]


class SlotPool:
    """The device side of continuous batching: `admit` a prompt into a free slot (-> its first
    token), `step` every slot by one token (-> each slot's next token). Not thread-safe: one
    thread (the scheduler) owns it."""

    def __init__(self, engine: Engine, slots: int):
        if slots < 1:
            raise ValueError(f"need at least one slot, got {slots}")
        self.engine, self.slots, self.context = engine, slots, engine.cfg.sequence_len
        self.cache = engine.empty_cache(slots, self.context)
        self.rows = {"seed": jnp.zeros(slots, jnp.uint32), "stream": jnp.zeros(slots, jnp.int32),
                     "temperature": jnp.zeros(slots, jnp.float32), "top_k": jnp.zeros(slots, jnp.int32),
                     "top_p": jnp.ones(slots, jnp.float32)}
        self._set_row = jax.jit(_set_row, donate_argnums=0)
        self._sample = jax.jit(_sample)

    def admit(self, slot: int, prompt: list[int], sampling: Sampling) -> int:
        """Prefill `prompt` into `slot` (its previous contents are dropped); the first sampled token."""
        if not 0 < len(prompt) < self.context:
            raise ValueError(f"a prompt needs 1 to {self.context - 1} tokens, got {len(prompt)}")
        logits, prompt_cache = self.engine.prefill_prompt(prompt)
        self.cache = self.engine.insert_rows(self.cache, prompt_cache, np.array([slot], np.int32))
        values = {"seed": np.uint32(sampling.seed % 2**32), "stream": np.int32(sampling.stream),
                  "temperature": np.float32(sampling.temperature), "top_k": np.int32(sampling.top_k),
                  "top_p": np.float32(sampling.top_p)}
        self.rows, first = self._set_row(self.rows, logits, np.int32(slot), values)
        return int(first)

    def step(self, tokens, positions, steps) -> np.ndarray:
        """Decode `tokens` (slots,) at `positions` (slots,) and draw each slot's next token, the
        `steps`-th (slots,) of its request; each slot's sampled token."""
        engine, positions = self.engine, np.asarray(positions, np.int32)
        logits, self.cache = engine.decode_step(engine.params, np.asarray(tokens, np.int32)[:, None], self.cache,
                                                positions, kv_len=engine.bucket(int(positions.max()) + 1))
        return np.asarray(self._sample(self.rows, logits, np.asarray(steps, np.int32)))
