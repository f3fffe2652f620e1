"""Inference engine: KV-cached generation with bucketed shapes, batched sampling and the calculator tool.

nanochat's Engine as jitted pure functions of (params, cache), the cache passed in and returned
(donated, so it is updated in place: one buffer per layer, written by a scatter, never copied). A
prompt is prefilled once at batch 1, right-padded to the smallest length bucket that holds it so
that a conversation compiles once per bucket rather than once per length (optionally in chunks,
bounding activation memory for long prompts). The cache is then broadcast to `num_samples` rows
and padded to a bucketed length, and each step decodes one token per row and samples the next on
device; attention reads only the cache slots up to the bucket holding the longest row, so a large
cache costs nothing until it is filled. A small state machine per row, on the host, injects
forced tokens: the calculator's result after `<|python_end|>`. `generate_many` runs the rows of
many prompts in one batch, each prompt prefilled into free rows of one cache as others finish.

Fixed from nanochat: every row samples its own first token from the prefill logits (nanochat drew
one and broadcast it, so all samples shared it), and each request follows its own seed: row j's
draw at step t uses the key (seed, j, t), so it does not depend on the rows beside it.
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

MAX_ROWS = 64  # generate_many's default bound on rows decoding at once


def bucket_sizes(sequence_len: int, buckets=None) -> tuple[int, ...]:
    """Sorted lengths that prompts and caches are padded up to; the context length is always last.
    Default: 64, 128, 256, ... below the context length."""
    if buckets is None:
        buckets = [64 * 2**i for i in range(sequence_len.bit_length()) if 64 * 2**i < sequence_len]
    return tuple(sorted({int(b) for b in buckets if 0 < b < sequence_len} | {sequence_len}))


def sample_tokens(logits, keys, temperature, top_k: int | None = None):
    """One token per row of logits (B, V), row b drawing with its own key keys[b]: the argmax at
    temperature 0, else a draw from softmax(logits / temperature), restricted to the k largest
    logits when top_k is set. Own keys make a row's draws independent of the rows beside it."""
    scale = jnp.where(temperature > 0, temperature, 1.0)
    draw = jax.vmap(lambda key, row: jax.random.categorical(key, row / scale))
    if top_k is None:
        sampled = draw(keys, logits)
    else:
        values, indices = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))
        sampled = jnp.take_along_axis(indices, draw(keys, values)[:, None], axis=-1)[:, 0]
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


def row_keys(seeds, samples, steps):
    """The key of each row's draw: its request's seed, folded with the row's sample index and the
    step (0 for the token drawn from the prefill). (B,) uint32/int32 arrays -> (B,) keys."""
    fold = jax.random.fold_in
    return jax.vmap(lambda seed, sample, step: fold(fold(jax.random.key(seed), sample), step))(seeds, samples, steps)


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


def _decode_step(graphdef, params, tokens, cache, positions, kv_len=None):
    """Tokens (B, 1) at positions (B,) -> logits (B, V) and the cache holding their keys/values;
    attention reads the cache's first `kv_len` slots (None: all)."""
    logits, cache = model_lib.decode(graphdef, params, tokens, cache, positions[:, None], kv_len=kv_len)
    return logits[:, 0], cache


def _sample_step(graphdef, params, tokens, cache, positions, seeds, samples, steps, temperature, top_k, kv_len):
    logits, cache = _decode_step(graphdef, params, tokens, cache, positions, kv_len)
    return sample_tokens(logits, row_keys(seeds, samples, steps), temperature, top_k), cache


def _sample_rows(logits, seeds, samples, steps, temperature, top_k):
    """One draw per row (seeds, samples, steps: (B,)) from logits (B, V), or from one row (1, V)."""
    logits = jnp.broadcast_to(logits, (seeds.shape[0], logits.shape[-1]))
    return sample_tokens(logits, row_keys(seeds, samples, steps), temperature, top_k)


def _expand(cache, rows, length):
    """The batch-1 prefill cache as `rows` rows of `length` slots (slots past a row's position are
    masked by the model, so the padding's contents never matter)."""
    def grow(x):
        x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))
        return jnp.broadcast_to(x, (rows,) + x.shape[1:])
    return jax.tree.map(grow, cache)


def _insert(cache, prompt_cache, rows):
    """The batch-1 prefill cache (1, P, ...) written into rows `rows` (R,) of the cache, slots 0..P-1
    (in place: the cache is donated)."""
    def put(big, small):
        return big.at[rows, :small.shape[1]].set(jnp.broadcast_to(small, (rows.shape[0],) + small.shape[1:]))
    return jax.tree.map(put, cache, prompt_cache)


def _take_rows(cache, rows):
    """The cache's rows `rows` (R,), in that order: a smaller batch once rows have finished."""
    return jax.tree.map(lambda x: x[rows], cache)


@dataclasses.dataclass
class RowState:
    """One sample's tool-use state: tokens queued to be forced, and the python block being read."""
    forced: collections.deque = dataclasses.field(default_factory=collections.deque)
    in_python_block: bool = False
    python_tokens: list = dataclasses.field(default_factory=list)
    completed: bool = False


@dataclasses.dataclass
class _Row:
    """A row of generate_many's batch: sample `sample` of prompt `prompt`, its tool state, and
    the token it emitted last, which goes into the cache at `position` at the next step."""
    prompt: int
    sample: int
    position: int
    token: int = 0
    emitted: int = 0
    state: RowState = dataclasses.field(default_factory=RowState)


class Engine:
    """Generates from one prompt, `num_samples` rows at a time, or from many prompts at once, with
    a KV cache.

    `prefill(params, tokens (1, P), length)` and `decode_step(params, tokens (B, 1), cache,
    positions (B,), kv_len=None)` are the jitted steps (each -> (logits, cache), the cache
    donated; `kv_len`, static, bounds the cache slots attention reads, None: all of them);
    `generate` streams columns, `generate_batch` collects whole rows and `generate_many` does so
    for many prompts decoding together. `buckets` are the padded
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
        self.set_params(params)
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
                                   static_argnames="kv_len", out_shardings=(None, cache_out))
        self._sample_step = jax.jit(functools.partial(_sample_step, graphdef), donate_argnums=2,
                                    static_argnames=("top_k", "kv_len"), out_shardings=(None, cache_out))
        self._sample_rows = jax.jit(_sample_rows, static_argnames="top_k")
        self._expand = jax.jit(_expand, static_argnums=(1, 2), out_shardings=cache_out)
        self.insert_rows = jax.jit(_insert, donate_argnums=0, out_shardings=cache_out)
        self._take_rows = jax.jit(_take_rows, out_shardings=cache_out)

    def set_params(self, params) -> None:
        """Decode with new weights (RL's, after each optimizer step) through the steps compiled
        already: the jitted steps take the params as an argument, and weights of the same shapes,
        dtype and sharding compile nothing new. Decoding reads every weight once per step, and the
        model casts each one to the compute dtype before use anyway: holding them cast is exact and
        halves the bytes read in bf16."""
        self.params = jax.tree.map(lambda p: p.astype(self.cfg.dtype), params)

    def bucket(self, length: int) -> int:
        """The smallest bucket that holds `length` positions."""
        for size in self.buckets:
            if size >= length:
                return size
        raise ValueError(f"{length} positions exceed the model's context of {self.cfg.sequence_len}")

    def empty_cache(self, rows: int, length: int) -> list:
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
        cache = self._expand(cache, num_samples, self.bucket(max(n + max_tokens, cache[0]["k"].shape[1])))
        seeds, samples = np.full(num_samples, seed % 2**32, np.uint32), np.arange(num_samples, dtype=np.int32)
        steps = np.zeros(num_samples, np.int32)
        sampled = self._sample_rows(logits, seeds, samples, steps, temperature, top_k=top_k)
        rows = [RowState() for _ in range(num_samples)]
        for step in range(max_tokens):
            if step:
                position = n + step - 1
                sampled, cache = self._sample_step(self.params, np.array(column, np.int32)[:, None], cache,
                                                   np.full(num_samples, position, np.int32), seeds, samples,
                                                   steps + step, temperature, top_k=top_k,
                                                   kv_len=self.bucket(position + 1))
            column, masks = zip(*(self.advance(row, token) for row, token in zip(rows, np.asarray(sampled).tolist())))
            yield list(column), list(masks)
            if all(row.completed for row in rows):
                return

    def advance(self, row: RowState, sampled: int) -> tuple[int, int]:
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

    def generate_many(self, prompts: list[list[int]], num_samples: int = 1, max_tokens: int = 256,
                      temperature: float = 1.0, top_k: int | None = None, seed: int = 42,
                      max_rows: int | None = None, keep_stop: bool = False) -> list[tuple[list[list[int]], list[list[int]]]]:
        """For each prompt, (rows, masks) as `generate_batch(prompt, num_samples, ...)` gives them,
        with prompt i drawing as generate_batch with `seed + i` does (row j of a prompt draws with
        key (seed, j, step), whatever rows decode beside it), so a prompt's result does not depend
        on the batch it shared. The rows of many prompts decode together, at most `max_rows` at once
        (default MAX_ROWS; the rows of max_rows // num_samples prompts): each prompt is prefilled
        into free rows of one cache and its rows step at their own positions; a finished row frees
        its place for the next prompt, and once no prompt waits the batch shrinks by halves as rows
        finish. Each row stops at a stop token, after `max_tokens` tokens or at the end of the
        context. With `keep_stop` a row keeps the stop token it sampled as its last token (RL
        trains on it, and needs to know which of `stop_tokens` it was)."""
        context = self.cfg.sequence_len
        if not prompts:
            return []
        if any(not 0 < len(p) < context for p in prompts):
            raise ValueError(f"every prompt needs 1 to {context - 1} tokens")
        if num_samples < 1 or max_tokens < 1:
            raise ValueError(f"num_samples and max_tokens must be at least 1, got {num_samples}, {max_tokens}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        max_rows = max(MAX_ROWS, num_samples) if max_rows is None else max_rows
        if max_rows < num_samples:
            raise ValueError(f"max_rows {max_rows} is fewer than num_samples {num_samples}")
        results = [([list(p) for _ in range(num_samples)], [[0] * len(p) for _ in range(num_samples)]) for p in prompts]
        width = min(max_rows // num_samples, len(prompts)) * num_samples
        cache = self.empty_cache(width, max(self.bucket(min(len(p) + max_tokens, context)) for p in prompts))
        slots: list[_Row | None] = [None] * width
        waiting = collections.deque(range(len(prompts)))
        temperature = float(temperature)

        def emit(slot: int, sampled: int):
            """Pass a row's sampled token through its tool state; free the row once it is done."""
            row = slots[slot]
            token, mask = self.advance(row.state, sampled)
            row.token, row.emitted = token, row.emitted + 1
            if keep_stop or not row.state.completed:
                results[row.prompt][0][row.sample].append(token)
                results[row.prompt][1][row.sample].append(mask)
            if row.state.completed or row.emitted == max_tokens or row.position + 1 == context:
                slots[slot] = None

        while True:
            free = [slot for slot, row in enumerate(slots) if row is None]
            while waiting and len(free) >= num_samples:
                i, rows, free = waiting.popleft(), free[:num_samples], free[num_samples:]
                logits, prompt_cache = self.prefill_prompt(prompts[i])
                cache = self.insert_rows(cache, prompt_cache, np.array(rows, np.int32))
                first = self._sample_rows(logits, np.full(num_samples, (seed + i) % 2**32, np.uint32),
                                          np.arange(num_samples, dtype=np.int32), np.zeros(num_samples, np.int32),
                                          temperature, top_k=top_k)
                for j, (slot, token) in enumerate(zip(rows, np.asarray(first).tolist())):
                    slots[slot] = _Row(i, j, position=len(prompts[i]))
                    emit(slot, token)
            live = [slot for slot, row in enumerate(slots) if row is not None]
            if not live:
                if waiting:
                    continue
                return results
            if not waiting and len(live) <= len(slots) // 2:
                width = 1 << (len(live) - 1).bit_length()
                keep = live + [live[0]] * (width - len(live))  # padding rows are copies, never read
                cache = self._take_rows(cache, np.array(keep, np.int32))
                slots, live = [slots[slot] for slot in live] + [None] * (width - len(live)), list(range(len(live)))
            tokens, positions, seeds, samples, steps = (np.zeros(len(slots), dtype) for dtype in
                                                        (np.int32, np.int32, np.uint32, np.int32, np.int32))
            for slot in live:  # free rows decode token 0 at position 0 of their own row, never read
                row = slots[slot]
                tokens[slot], positions[slot], steps[slot] = row.token, row.position, row.emitted
                seeds[slot], samples[slot] = (seed + row.prompt) % 2**32, row.sample
            sampled, cache = self._sample_step(self.params, tokens[:, None], cache, positions, seeds, samples, steps,
                                               temperature, top_k=top_k, kv_len=self.bucket(int(positions.max()) + 1))
            sampled = np.asarray(sampled).tolist()
            for slot in live:
                slots[slot].position += 1
                emit(slot, sampled[slot])
