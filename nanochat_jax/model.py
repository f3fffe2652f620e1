"""The nanochat GPT (seed version) in Flax NNX, used as a pure function of its parameters.

token embedding -> RMSNorm -> blocks (pre-norm attention with half-split rotary and QK-norm after
rotary, GQA; relu^2 MLP) -> RMSNorm -> untied LM head -> 15*tanh(x/15) in fp32 -> cross-entropy.
No biases, no norm gains, no positional embeddings. Weights are fp32 masters; matmuls run in
`compute_dtype` (bf16 on accelerators). Kernels are Flax-style (fan_in, fan_out).

Callers hold a `graphdef` and a plain nested dict of parameters (`nnx.split(...).to_pure_dict()`);
`forward`/`loss` merge them back inside jit, so training, eval and sampling are pure functions.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from nanochat_jax import attention as attn_lib
from nanochat_jax.sharding import constrain

ACT = ("batch", "act_seq", "act_embed")
ACT_HEADS = ("batch", "act_seq", "act_heads", None)
ACT_MLP = ("batch", "act_seq", "act_mlp")
REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    n_layer: int
    dim: int
    n_head: int
    n_kv_head: int
    sequence_len: int = 2048
    rope_base: float = 10000.0
    softcap: float = 15.0
    compute_dtype: str = "float32"
    attention: str = "xla"
    remat: str = "none"
    loss_chunk: int = 0  # sequence positions per logits chunk in the loss; 0 = all at once

    def __post_init__(self):
        if self.dim % self.n_head:
            raise ValueError(f"dim {self.dim} is not divisible by n_head {self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")
        if (self.dim // self.n_head) % 2:
            raise ValueError(f"head dim {self.dim // self.n_head} must be even for rotary")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {tuple(REMAT_POLICIES)}, got {self.remat!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def dtype(self):
        return jnp.dtype(self.compute_dtype)

    @classmethod
    def from_config(cls, m) -> "GPTConfig":
        """Derive the model from a config's `model` section as nanochat does from depth."""
        dim = m.dim or 64 * m.depth
        n_head = m.n_head or max(1, math.ceil(dim / m.head_dim))
        compute_dtype = m.compute_dtype
        if compute_dtype == "auto":
            compute_dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
        return cls(
            vocab_size=m.vocab_size, n_layer=m.depth, dim=dim, n_head=n_head,
            n_kv_head=m.n_kv_head or n_head, sequence_len=m.sequence_len, rope_base=m.rope_base,
            softcap=m.softcap, compute_dtype=compute_dtype,
            attention=attn_lib.resolve_backend(m.attention, compute_dtype),
            remat=m.remat, loss_chunk=m.loss_chunk,
        )


def rms_norm(x, eps: float = 1e-6):
    """Parameter-free RMSNorm over the last dim, computed in fp32."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def rotary_tables(positions, head_dim: int, base: float):
    """cos and sin of shape (*positions.shape, head_dim/2) for integer positions, in fp32."""
    inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x, cos, sin):
    """nanochat's half-split rotary on (B, T, H, D): (x1, x2) -> (x1 cos + x2 sin, -x1 sin + x2 cos).

    cos/sin are (T, D/2) for positions shared by the batch or (B, T, D/2) for per-row positions."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    cos, sin = (cos[None], sin[None]) if cos.ndim == 2 else (cos, sin)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * cos + x2 * sin, x2 * cos - x1 * sin], axis=-1).astype(x.dtype)


def softcap_logits(logits, cap: float):
    logits = logits.astype(jnp.float32)
    return cap * jnp.tanh(logits / cap)


class Linear(nnx.Module):
    """Bias-free linear layer. Init N(0, sigma), sigma = min(1, sqrt(out/in)) / sqrt(in) (arXiv 2310.17813)."""

    def __init__(self, fan_in: int, fan_out: int, axes: tuple, *, rngs: nnx.Rngs, zero_init: bool = False):
        if zero_init:
            kernel = jnp.zeros((fan_in, fan_out), jnp.float32)
        else:
            std = fan_in ** -0.5 * min(1.0, math.sqrt(fan_out / fan_in))
            kernel = std * jax.random.normal(rngs.params(), (fan_in, fan_out), jnp.float32)
        self.kernel = nnx.Param(kernel, logical_axes=axes)

    def __call__(self, x):
        return jnp.dot(x, self.kernel[...].astype(x.dtype))


class CausalSelfAttention(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        hd = cfg.head_dim
        self.c_q = Linear(cfg.dim, cfg.n_head * hd, ("embed", "heads"), rngs=rngs)
        self.c_k = Linear(cfg.dim, cfg.n_kv_head * hd, ("embed", "heads"), rngs=rngs)
        self.c_v = Linear(cfg.dim, cfg.n_kv_head * hd, ("embed", "heads"), rngs=rngs)
        self.c_proj = Linear(cfg.n_head * hd, cfg.dim, ("heads", "embed"), rngs=rngs, zero_init=True)

    def __call__(self, x, cos, sin, cache=None, positions=None, kv_len=None, attend=None):
        """Self-attention over the sequence (causal, or `attend(q, k, v)` after rotary and QK norm:
        another mask, such as the CORE scorer's shared prefixes); or, with `cache` = this layer's
        {"k", "v"} of shape (B, S, Hkv, D), the new tokens' keys and values are written at their
        `positions` (B, T) and the queries attend to the cached positions up to their own, reading
        only the first `kv_len` slots (None: all S). Returns (out, cache) then. The write is a scatter into the layer's own
        buffer, which XLA does in place when the cache is donated; in one (layers, ...) array it
        copied the whole cache at every step."""
        cfg, (batch, seq, _) = self.cfg, x.shape
        q = constrain(self.c_q(x).reshape(batch, seq, cfg.n_head, cfg.head_dim), ACT_HEADS)
        k = constrain(self.c_k(x).reshape(batch, seq, cfg.n_kv_head, cfg.head_dim), ACT_HEADS)
        v = constrain(self.c_v(x).reshape(batch, seq, cfg.n_kv_head, cfg.head_dim), ACT_HEADS)
        q = rms_norm(apply_rotary(q, cos, sin))
        k = rms_norm(apply_rotary(k, cos, sin))
        if cache is None:
            y = attn_lib.attention(q, k, v, backend=cfg.attention, causal=True) if attend is None else attend(q, k, v)
            return self.c_proj(y.reshape(batch, seq, cfg.n_head * cfg.head_dim))
        rows = jnp.arange(batch)[:, None]
        cache = {name: cache[name].at[rows, positions].set(new.astype(cache[name].dtype), unique_indices=True)
                 for name, new in (("k", k), ("v", v))}
        y = attn_lib.cached_attention(q, cache["k"], cache["v"], positions, backend=cfg.attention, kv_len=kv_len)
        return self.c_proj(y.reshape(batch, seq, cfg.n_head * cfg.head_dim)), cache


class MLP(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.c_fc = Linear(cfg.dim, 4 * cfg.dim, ("embed", "mlp"), rngs=rngs)
        self.c_proj = Linear(4 * cfg.dim, cfg.dim, ("mlp", "embed"), rngs=rngs, zero_init=True)

    def __call__(self, x):
        return self.c_proj(constrain(jnp.square(jax.nn.relu(self.c_fc(x))), ACT_MLP))


class Block(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.attn = CausalSelfAttention(cfg, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, cos, sin, attend=None):
        x = x + self.attn(rms_norm(x), cos, sin, attend=attend)
        x = x + self.mlp(rms_norm(x))
        return constrain(x, ACT)

    def cached(self, x, cos, sin, cache, positions, kv_len):
        y, cache = self.attn(rms_norm(x), cos, sin, cache, positions, kv_len)
        x = x + y
        return x + self.mlp(rms_norm(x)), cache


class GPT(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.wte = nnx.Param(jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.dim), jnp.float32),
                             logical_axes=("vocab", "embed"))
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layer)])
        self.lm_head = Linear(cfg.dim, cfg.vocab_size, ("embed", "vocab"), rngs=rngs, zero_init=True)

    def hidden(self, idx, positions=None, attend=None):
        """Final normalised hidden states (B, T, dim) in the compute dtype. `positions`: (T,) or per
        row (B, T); `attend`: see CausalSelfAttention."""
        cfg = self.cfg
        if positions is None:
            positions = jnp.arange(idx.shape[1])
        cos, sin = rotary_tables(positions, cfg.head_dim, cfg.rope_base)
        x = constrain(rms_norm(jnp.take(self.wte[...], idx, axis=0).astype(cfg.dtype)), ACT)
        policy = REMAT_POLICIES[cfg.remat]
        for block in self.blocks:
            if policy is None:
                x = block(x, cos, sin, attend)
            else:
                graphdef, state = nnx.split(block)
                run = jax.checkpoint(lambda s, h: nnx.merge(graphdef, s)(h, cos, sin, attend), policy=policy)
                x = run(state, x)
        return rms_norm(x)

    def decode(self, idx, cache: list, positions, logits_at=None, kv_len=None):
        """Logits of new tokens `idx` (B, T) at absolute `positions` (B, T), and the cache with their
        keys and values written: one {"k", "v"} of shape (B, S, Hkv, D) per layer. Attention reads
        the first `kv_len` slots (a static bound above every position; None: all of them). With
        `logits_at` (B,), only each row's logits at that index of T are computed, (B, vocab): a
        prefill needs one."""
        cfg = self.cfg
        cos, sin = rotary_tables(positions, cfg.head_dim, cfg.rope_base)
        x = rms_norm(jnp.take(self.wte[...], idx, axis=0).astype(cfg.dtype))
        new_cache = []
        for block, layer_cache in zip(self.blocks, cache, strict=True):
            x, layer_cache = block.cached(x, cos, sin, layer_cache, positions, kv_len)
            new_cache.append(layer_cache)
        if logits_at is not None:
            x = x[jnp.arange(x.shape[0]), logits_at]
        return self.logits(rms_norm(x)), new_cache

    def logits(self, h):
        """Softcapped fp32 logits of final hidden states."""
        return softcap_logits(self.lm_head(h), self.cfg.softcap)

    def __call__(self, idx, positions=None):
        """Softcapped fp32 logits (B, T, vocab)."""
        return self.logits(self.hidden(idx, positions))

    def token_losses(self, idx, targets):
        """Per-token cross-entropy in nats (B, T); targets < 0 are ignored and give 0."""
        cfg = self.cfg
        return chunked_token_losses(self.hidden(idx), self.lm_head.kernel[...], targets,
                                    softcap=cfg.softcap, chunk=cfg.loss_chunk)

    def loss(self, idx, targets):
        """Mean cross-entropy over the targets that are not ignored (0 if all are)."""
        losses = self.token_losses(idx, targets)
        count = jnp.sum(targets >= 0)
        return jnp.sum(losses) / jnp.maximum(count, 1)


def _token_losses(h, kernel, targets, softcap):
    logits = softcap_logits(jnp.dot(h, kernel.astype(h.dtype), preferred_element_type=jnp.float32), softcap)
    picked = jnp.take_along_axis(logits, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(targets >= 0, jax.nn.logsumexp(logits, axis=-1) - picked, 0.0)


def chunked_token_losses(h, kernel, targets, *, softcap: float, chunk: int):
    """Cross-entropy without materialising all logits: the sequence is cut into `chunk`-long
    pieces whose logits are recomputed in the backward pass, so peak memory holds one
    (B, chunk, vocab) block instead of (B, T, vocab). The batch dim stays whole (and sharded)."""
    batch, seq, dim = h.shape
    if not chunk or seq <= chunk:
        return _token_losses(h, kernel, targets, softcap)
    pad = (-seq) % chunk
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=-1)
    n = (seq + pad) // chunk
    h_chunks = h.reshape(batch, n, chunk, dim).swapaxes(0, 1)
    t_chunks = targets.reshape(batch, n, chunk).swapaxes(0, 1)
    piece = jax.checkpoint(lambda hc, tc: _token_losses(hc, kernel, tc, softcap))
    losses = jax.lax.map(lambda xs: piece(*xs), (h_chunks, t_chunks))
    return losses.swapaxes(0, 1).reshape(batch, n * chunk)[:, :seq]


# ---- parameters as plain pytrees -------------------------------------------------------------

def abstract_model(cfg: GPTConfig):
    """(graphdef, parameter shapes, logical axes) without allocating any weights."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))))
    logical = jax.tree.map(lambda v: v.get_metadata()["logical_axes"], state,
                           is_leaf=lambda v: isinstance(v, nnx.Variable))
    return graphdef, state.to_pure_dict(), logical.to_pure_dict()


def init_params(cfg: GPTConfig, key, shardings=None):
    """Fresh fp32 parameters as a nested dict, created directly in their shardings (if given)."""
    init = lambda k: nnx.split(GPT(cfg, rngs=nnx.Rngs(k)))[1].to_pure_dict()
    return jax.jit(init, out_shardings=shardings)(key)


def empty_cache(cfg: GPTConfig, batch: int, length: int) -> list:
    """A zeroed KV cache for `batch` rows of up to `length` positions, in the compute dtype: per
    layer, {"k", "v"} of shape (batch, length, Hkv, D)."""
    shape = (batch, length, cfg.n_kv_head, cfg.head_dim)
    return [{"k": jnp.zeros(shape, cfg.dtype), "v": jnp.zeros(shape, cfg.dtype)} for _ in range(cfg.n_layer)]


def decode(graphdef, params, idx, cache, positions, logits_at=None, kv_len=None):
    return nnx.merge(graphdef, params).decode(idx, cache, positions, logits_at, kv_len)


def forward(graphdef, params, idx, positions=None):
    return nnx.merge(graphdef, params)(idx, positions)


def loss_fn(graphdef, params, idx, targets):
    return nnx.merge(graphdef, params).loss(idx, targets)


def summed_loss_fn(graphdef, params, idx, targets, weights=None):
    """Sum over the non-ignored targets of cross-entropy, each times its weight (1 without weights):
    a training step divides it by the step's own normaliser."""
    losses = nnx.merge(graphdef, params).token_losses(idx, targets)
    return jnp.sum(losses if weights is None else losses * weights)


def num_params(cfg: GPTConfig) -> int:
    _, shapes, _ = abstract_model(cfg)
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def flops_per_token(cfg: GPTConfig) -> int:
    """nanochat's estimate: 6 per non-embedding parameter plus attention at full context."""
    n_embedding = cfg.vocab_size * cfg.dim
    attention = 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * cfg.sequence_len
    return 6 * (num_params(cfg) - n_embedding) + attention
