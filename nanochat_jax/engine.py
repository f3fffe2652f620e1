"""Inference engine: KV-cached generation with bucketed shapes, batched sampling and the calculator tool.

nanochat's Engine as jitted pure functions of (params, cache), the cache passed in and returned
(donated, so it is updated in place). A prompt is prefilled once at batch 1, right-padded to the
smallest length bucket that holds it so that a conversation compiles once per bucket rather than
once per length (optionally in chunks, bounding activation memory for long prompts). The cache is
then broadcast to `num_samples` rows and padded to a bucketed length, and each step decodes one
token per row and samples the next on device. A small state machine per row, on the host, injects
forced tokens: the calculator's result after `<|python_end|>`.

Fixed from nanochat: every row samples its own first token from the prefill logits (nanochat drew
one and broadcast it, so all samples shared it), and each request follows its own seed.
"""
import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from nanochat_jax import model as model_lib
from nanochat_jax.tools import use_calculator


def bucket_sizes(sequence_len: int, buckets=None) -> tuple[int, ...]:
    """Sorted lengths that prompts and caches are padded up to; the context length is always last.
    Default: 64, 128, 256, ... below the context length."""
    if buckets is None:
        buckets = [64 * 2**i for i in range(sequence_len.bit_length()) if 64 * 2**i < sequence_len]
    return tuple(sorted({int(b) for b in buckets if 0 < b < sequence_len} | {sequence_len}))


def sample_tokens(logits, key, temperature, top_k: int | None = None):
    """One token per row of logits (B, V): the argmax at temperature 0, else a draw from
    softmax(logits / temperature), restricted to the k largest logits when top_k is set."""
    scale = jnp.where(temperature > 0, temperature, 1.0)
    if top_k is None:
        sampled = jax.random.categorical(key, logits / scale, axis=-1)
    else:
        values, indices = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))
        choice = jax.random.categorical(key, values / scale, axis=-1)
        sampled = jnp.take_along_axis(indices, choice[:, None], axis=-1)[:, 0]
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


# ---- jitted pure functions (graphdef and config are bound with functools.partial) ------------

def _extend(graphdef, params, tokens, cache, start, last):
    """Write `tokens` (1, T) into the cache at positions start.., returning the logits (1, V) at
    index `last` of the chunk."""
    positions = start + jnp.arange(tokens.shape[1])[None]
    return model_lib.decode(graphdef, params, tokens, cache, positions, logits_at=jnp.reshape(last, (1,)))


def _prefill(graphdef, cfg, params, tokens, length):
    """A fresh batch-1 cache as long as the padded prompt (1, P); logits at position length - 1."""
    cache = model_lib.empty_cache(cfg, 1, tokens.shape[1])
    return _extend(graphdef, params, tokens, cache, 0, length - 1)


def _decode_step(graphdef, params, tokens, cache, positions):
    """Tokens (B, 1) at positions (B,) -> logits (B, V) and the cache holding their keys/values."""
    logits, cache = model_lib.decode(graphdef, params, tokens, cache, positions[:, None])
    return logits[:, 0], cache


def _sample_step(graphdef, params, tokens, cache, positions, key, temperature, top_k):
    logits, cache = _decode_step(graphdef, params, tokens, cache, positions)
    key, sub = jax.random.split(key)
    return sample_tokens(logits, sub, temperature, top_k), cache, key


def _sample_rows(logits, key, temperature, rows, top_k):
    """`rows` independent draws from the prefill logits (1, V)."""
    key, sub = jax.random.split(key)
    return sample_tokens(jnp.broadcast_to(logits, (rows, logits.shape[-1])), sub, temperature, top_k), key


def _expand(cache, rows, length):
    """The batch-1 prefill cache as `rows` rows of `length` slots (slots past a row's position are
    masked by the model, so the padding's contents never matter)."""
    def grow(x):
        x = jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, 0), (0, 0)))
        return jnp.broadcast_to(x, (x.shape[0], rows) + x.shape[2:])
    return jax.tree.map(grow, cache)


@dataclasses.dataclass
class RowState:
    """One sample's tool-use state: tokens queued to be forced, and the python block being read."""
    forced: collections.deque = dataclasses.field(default_factory=collections.deque)
    in_python_block: bool = False
    python_tokens: list = dataclasses.field(default_factory=list)
    completed: bool = False


class Engine:
    """Generates from one prompt, `num_samples` rows at a time, with a KV cache.

    `prefill(params, tokens (1, P), length)` and `decode_step(params, tokens (B, 1), cache,
    positions (B,))` are the jitted steps (each -> (logits, cache), the cache donated);
    `generate` streams columns and `generate_batch` collects whole rows. `buckets` are the padded
    lengths (see `bucket_sizes`); `prefill_chunk` caps the tokens one prefill call processes.
    Parameters may be sharded over a mesh; the cache is then replicated over it.
    """

    def __init__(self, graphdef, params, model_cfg: model_lib.GPTConfig, tokenizer, *, buckets=None,
                 prefill_chunk: int | None = None):
        self.cfg, self.tokenizer = model_cfg, tokenizer
        self.buckets = bucket_sizes(model_cfg.sequence_len, buckets)
        if prefill_chunk is not None and any(b > prefill_chunk and b % prefill_chunk for b in self.buckets):
            raise ValueError(f"prefill_chunk {prefill_chunk} must divide every longer bucket of {self.buckets}")
        self.prefill_chunk = prefill_chunk
        # Decoding reads every weight once per step, and the model casts each one to the compute
        # dtype before use anyway: holding them cast is exact and halves the bytes read in bf16.
        self.params = jax.tree.map(lambda p: p.astype(model_cfg.dtype), params)
        sharding = jax.tree.leaves(self.params)[0].sharding
        self.cache_sharding = NamedSharding(sharding.mesh, P()) if isinstance(sharding, NamedSharding) else None
        special = tokenizer.encode_special
        self.stop_tokens = (special("<|assistant_end|>"), tokenizer.bos_id)
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")

        cache_out = self.cache_sharding
        self.prefill = jax.jit(functools.partial(_prefill, graphdef, model_cfg), out_shardings=(None, cache_out))
        self.prefill_chunk_step = jax.jit(functools.partial(_extend, graphdef), donate_argnums=2,
                                          out_shardings=(None, cache_out))
        self.decode_step = jax.jit(functools.partial(_decode_step, graphdef), donate_argnums=2,
                                   out_shardings=(None, cache_out))
        self._sample_step = jax.jit(functools.partial(_sample_step, graphdef), donate_argnums=2,
                                    static_argnames="top_k", out_shardings=(None, cache_out, None))
        self._sample_rows = jax.jit(_sample_rows, static_argnames=("rows", "top_k"))
        self._expand = jax.jit(_expand, static_argnums=(1, 2), out_shardings=cache_out)

    def bucket(self, length: int) -> int:
        """The smallest bucket that holds `length` positions."""
        for size in self.buckets:
            if size >= length:
                return size
        raise ValueError(f"{length} positions exceed the model's context of {self.cfg.sequence_len}")

    def empty_cache(self, rows: int, length: int) -> dict:
        """A zeroed cache placed as the steps return theirs, so feeding it back compiles nothing new."""
        return jax.device_put(model_lib.empty_cache(self.cfg, rows, length), self.cache_sharding)

    def prefill_prompt(self, tokens: list[int]):
        """Logits (1, V) after the prompt, and its batch-1 cache as long as the prompt's bucket."""
        n = len(tokens)
        size = self.bucket(n)
        padded = np.zeros((1, size), np.int32)
        padded[0, :n] = tokens
        chunk = self.prefill_chunk
        if chunk is None or size <= chunk:
            return self.prefill(self.params, padded, n)
        cache = self.empty_cache(1, size)
        for start in range(0, n, chunk):
            logits, cache = self.prefill_chunk_step(self.params, padded[:, start:start + chunk], cache, start,
                                                    min(n - start, chunk) - 1)
        return logits, cache

    def generate(self, tokens: list[int], num_samples: int = 1, max_tokens: int | None = 256,
                 temperature: float = 1.0, top_k: int | None = None, seed: int = 42):
        """Stream one (token column, mask column) per step: each row's next token, and 1 where it
        was sampled or 0 where it was forced. Stops after `max_tokens` steps (forced tokens count;
        None: until the context is full) or once every row has emitted `<|assistant_end|>` or
        `<|bos|>`. Arguments are checked here, at the call; the work runs as the stream is read."""
        n, context = len(tokens), self.cfg.sequence_len
        if n == 0:
            raise ValueError("the prompt needs at least one token")
        max_tokens = context - n if max_tokens is None else max_tokens
        if n + max_tokens > context:
            raise ValueError(f"prompt of {n} tokens + max_tokens {max_tokens} exceeds the model's context of {context}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        return self._stream(list(tokens), num_samples, max_tokens, float(temperature), top_k, seed)

    def _stream(self, tokens, num_samples, max_tokens, temperature, top_k, seed):
        n = len(tokens)
        logits, cache = self.prefill_prompt(tokens)
        cache = self._expand(cache, num_samples, self.bucket(max(n + max_tokens, cache["k"].shape[2])))
        sampled, key = self._sample_rows(logits, jax.random.key(seed), temperature, rows=num_samples, top_k=top_k)
        rows = [RowState() for _ in range(num_samples)]
        for step in range(max_tokens):
            if step:
                positions = np.full(num_samples, n + step - 1, np.int32)
                sampled, cache, key = self._sample_step(self.params, np.array(column, np.int32)[:, None], cache,
                                                        positions, key, temperature, top_k=top_k)
            column, masks = zip(*(self._advance(row, token) for row, token in zip(rows, np.asarray(sampled).tolist())))
            yield list(column), list(masks)
            if all(row.completed for row in rows):
                return

    def _advance(self, row: RowState, sampled: int) -> tuple[int, int]:
        """The row's next token (a forced one if queued, else the sampled one) and its mask; runs
        the calculator when a python block closes. Finished rows pass samples through untouched."""
        if row.completed:
            return sampled, 1
        forced = bool(row.forced)
        token = row.forced.popleft() if forced else sampled
        if token in self.stop_tokens:
            row.completed = True
        elif token == self.python_start:
            row.in_python_block, row.python_tokens = True, []
        elif token == self.python_end and row.in_python_block:
            row.in_python_block = False
            if row.python_tokens:
                result = use_calculator(self.tokenizer.decode(row.python_tokens))
                if result is not None:
                    row.forced.extend([self.output_start, *self.tokenizer.encode(str(result)), self.output_end])
            row.python_tokens = []
        elif row.in_python_block:
            row.python_tokens.append(token)
        return token, 0 if forced else 1

    def generate_batch(self, tokens: list[int], num_samples: int = 1, **kwargs):
        """Each row's prompt + generated tokens (the terminal token excluded) and masks (0 for the
        prompt and forced tokens, 1 for sampled ones), generating until every row is done."""
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for column, mask_column in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(column, mask_column)):
                if done[i]:
                    continue
                if token in self.stop_tokens:
                    done[i] = True
                else:
                    results[i].append(token)
                    masks[i].append(mask)
        return results, masks
