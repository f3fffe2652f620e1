"""Benchmark the attention backends: training attention at the models' shapes, and decode.

    python -m launch.bench_attention --config=d20 --shapes=d12,d20,d26 --backends=xla,cudnn,pallas,mosaic
    python -m launch.bench_attention --config=tiny --batch=2 --seq-len=128 --pallas-interpret  # CPU

Training attention (causal, (B, T, H, Hkv, D) from each config in `--shapes`, default the
`--config` with its overrides): median forward and forward+backward time and TFLOP/s. FLOPs
count the causal half once, FlashAttention's convention: forward 4*B*H*T^2*D/2, backward 2.5x
that, so forward+backward is 3.5x the forward (model FLOPs: the Pallas backward recomputes
QK^T in both of its kernels, which is not credited). `err` is the forward output's relative
error against `xla` at the same shape.

Decode attention (`--decode-tq` new tokens per row against a cache of each `--decode-lengths`
length, every row full): median time, achieved bandwidth and the memory floor, the time to
read the K/V cache once at the device's peak HBM bandwidth (None where unknown, e.g. CPU).
`xla` is the model's cached_attention, `pallas` kernels/decode_attention.py.
`mosaic` (Hopper only) is the Mosaic GPU forward and backward of kernels/flash_attention_mgpu.py
and kernels/flash_attention_mgpu_bwd.py, and kernels/decode_attention_mgpu.py for decode.

A backend the platform lacks is skipped with a note: cudnn needs a GPU and 16-bit inputs;
pallas on CPU runs interpreted, very slowly, so only with `--pallas-interpret` (small shapes).
A backend that fails at one shape (out of memory, a kernel that does not compile) is noted and
the run goes on. The last line is one JSON object.
"""
import json
import statistics
import time

import jax
import jax.numpy as jnp

from kernels.decode_attention import decode_attention
from kernels.decode_attention_mgpu import mgpu_decode_attention
from kernels.flash_attention import BlockSizes, flash_attention
from kernels.mgpu_ops import MgpuBlocks
from launch import run
from nanochat_jax import attention as attn_lib
from nanochat_jax import hardware
from nanochat_jax.config import config_from_args, load_config
from nanochat_jax.model import GPTConfig

BACKENDS = ("xla", "cudnn", "pallas", "mosaic")


def add_arguments(parser):
    parser.add_argument("--shapes", default="", help="configs whose shapes to time, e.g. d12,d20,d26 (default: --config)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help=f"subset of {','.join(BACKENDS)}")
    parser.add_argument("--batch", type=int, default=0, help="batch size (0: the config's device batch)")
    parser.add_argument("--seq-len", type=int, default=0, help="sequence length (0: the config's)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                        help="auto: bfloat16 on GPU/TPU, float32 on CPU")
    parser.add_argument("--decode-lengths", default="512,1024,2048,4096,8192", help="cache lengths ('' to skip)")
    parser.add_argument("--decode-batch", type=int, default=8)
    parser.add_argument("--decode-tq", type=int, default=1, help="new tokens per row")
    parser.add_argument("--pallas-blocks", default="128,128,64,64", help="block_q,block_k,block_q_bwd,block_k_bwd")
    parser.add_argument("--mosaic-blocks", default="64,128,2,64,64,2",
                        help="block_q,block_k,stages of the mosaic forward, then of its backward; several "
                             "configs separated by ';' are each timed (a sweep)")
    parser.add_argument("--pallas-interpret", action="store_true", help="run pallas interpreted on CPU (slow)")
    parser.add_argument("--iters", type=int, default=10, help="timed calls per measurement")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls after compilation")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def skip_reason(backend: str, dtype, allow_interpret: bool) -> str | None:
    """Why `backend` cannot run here, or None."""
    on_gpu = jax.default_backend() == "gpu"
    if backend == "cudnn" and not on_gpu:
        return "cudnn needs a GPU"
    if backend == "cudnn" and jnp.dtype(dtype).itemsize != 2:
        return "cudnn needs 16-bit inputs"
    if backend == "mosaic" and not getattr(jax.devices()[0], "compute_capability", "").startswith("9"):
        return "mosaic needs a Hopper GPU (compute capability 9.x)"
    if backend == "mosaic" and jnp.dtype(dtype).itemsize != 2:
        return "mosaic needs 16-bit inputs"
    if backend == "pallas" and jax.default_backend() == "cpu" and not allow_interpret:
        return "pallas on CPU runs interpreted: pass --pallas-interpret (small shapes only)"
    return None


def time_call(fn, args, iters: int, warmup: int):
    """(median seconds per call, output) of jit(fn); compilation and warmup are not timed."""
    jitted = jax.jit(fn)
    out = jax.block_until_ready(jitted(*args))
    for _ in range(warmup):
        jax.block_until_ready(jitted(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(jitted(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def train_variants(backends, pallas_blocks: BlockSizes, mosaic_configs: list[tuple[MgpuBlocks, MgpuBlocks]]):
    """(label, attention function) per backend, and per --mosaic-blocks config for mosaic (labelled
    with its numbers when there are several, for a block-size sweep in one run)."""
    variants = []
    for backend in backends:
        if backend == "pallas":
            variants.append((backend, lambda q, k, v: flash_attention(q, k, v, causal=True, block_sizes=pallas_blocks)))
        elif backend == "mosaic":
            for config in mosaic_configs:
                numbers = ",".join(str(n) for blocks in config for n in (blocks.block_q, blocks.block_k, blocks.stages))
                label = backend if len(mosaic_configs) == 1 else f"mosaic[{numbers}]"
                variants.append((label, lambda q, k, v, config=config: flash_attention(
                    q, k, v, causal=True, mosaic=True, mosaic_blocks=config)))
        else:
            variants.append((backend, lambda q, k, v, backend=backend: attn_lib.attention(
                q, k, v, backend=backend, causal=True)))
    return variants


def forward_backward(fn):
    def run(q, k, v, d_out):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(d_out)
    return run


def relative_error(a, b) -> float:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def bench_train(name, shape, variants, dtype, args, notes) -> list[dict]:
    batch, seq, heads, kv_heads, head_dim = shape
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (batch, seq, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, seq, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, seq, kv_heads, head_dim), dtype)
    d_out = jax.random.normal(keys[3], q.shape, dtype)
    flops = 4 * batch * heads * seq * seq * head_dim / 2
    rows, reference = [], None
    for backend, fn in variants:
        row = dict(shape=name, batch=batch, seq=seq, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                   backend=backend, fwd_s=None, fwd_tflops=None, fwd_bwd_s=None, fwd_bwd_tflops=None, err=None)
        try:
            row["fwd_s"], out = time_call(fn, (q, k, v), args.iters, args.warmup)
            row["fwd_bwd_s"], _ = time_call(forward_backward(fn), (q, k, v, d_out), args.iters, args.warmup)
        except Exception as err:  # one failing backend or shape must not end the benchmark
            notes.append(f"{name} {backend}: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
            continue
        row["fwd_tflops"] = flops / row["fwd_s"] / 1e12
        row["fwd_bwd_tflops"] = 3.5 * flops / row["fwd_bwd_s"] / 1e12
        if backend == "xla":
            reference = out
        elif reference is not None:
            row["err"] = relative_error(out, reference)
        rows.append(row)
        print(f"{name:>6} B={batch} T={seq} H={heads}/{kv_heads} D={head_dim} {backend:>6}: "
              f"fwd {1e3 * row['fwd_s']:9.3f} ms {row['fwd_tflops']:8.3f} TFLOP/s | "
              f"fwd+bwd {1e3 * row['fwd_bwd_s']:9.3f} ms {row['fwd_bwd_tflops']:8.3f} TFLOP/s"
              + ("" if row["err"] is None else f" | err {row['err']:.1e}"), flush=True)
    return rows


def bench_decode(name, shape, lengths, backends, dtype, args, notes) -> list[dict]:
    _, _, heads, kv_heads, head_dim = shape
    batch, q_len = args.decode_batch, args.decode_tq
    bandwidth = hardware.memory_bandwidth(jax.devices()[0])
    rows = []
    for length in lengths:
        keys = jax.random.split(jax.random.key(1), 3)
        q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim), dtype)
        k_cache = jax.random.normal(keys[1], (batch, length, kv_heads, head_dim), dtype)
        v_cache = jax.random.normal(keys[2], (batch, length, kv_heads, head_dim), dtype)
        lens = jnp.full((batch,), length, jnp.int32)
        positions = jnp.broadcast_to(length - q_len + jnp.arange(q_len), (batch, q_len))
        moved = (2 * k_cache.size + 2 * q.size) * jnp.dtype(dtype).itemsize  # K, V once; q in, out
        floor = None if bandwidth is None else moved / bandwidth
        for backend in backends:
            if backend in ("pallas", "mosaic"):
                fn = mgpu_decode_attention if backend == "mosaic" else decode_attention
                inputs = (q, k_cache, v_cache, lens)
            else:
                fn, inputs = attn_lib.cached_attention, (q, k_cache, v_cache, positions)
            try:
                seconds, _ = time_call(fn, inputs, args.iters, args.warmup)
            except Exception as err:
                notes.append(f"{name} decode {length} {backend}: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
                continue
            row = dict(shape=name, batch=batch, tq=q_len, cache_len=length, heads=heads, kv_heads=kv_heads,
                       head_dim=head_dim, backend=backend, time_s=seconds, gb_per_s=moved / seconds / 1e9,
                       floor_s=floor, floor_frac=None if floor is None else floor / seconds)
            rows.append(row)
            floor_text = "n/a" if floor is None else f"{1e6 * floor:8.1f} us ({100 * row['floor_frac']:.0f}% of peak)"
            print(f"{name:>6} decode B={batch} Tq={q_len} S={length:>5} H={heads}/{kv_heads} D={head_dim} {backend:>6}: "
                  f"{1e6 * seconds:10.1f} us {row['gb_per_s']:8.1f} GB/s | floor {floor_text}", flush=True)
    return rows


def model_shape(cfg, args) -> tuple[int, int, int, int, int]:
    """(B, T, H, Hkv, D) of a config's attention layers."""
    model = GPTConfig.from_config(cfg.model)
    return (args.batch or cfg.train.device_batch_size, args.seq_len or model.sequence_len, model.n_head,
            model.n_kv_head, model.head_dim)


def main(argv=None):
    cfg, args = config_from_args(argv, description=__doc__, add_arguments=add_arguments)
    backends = [b for b in args.backends.split(",") if b]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        raise SystemExit(f"unknown backends {unknown}; choose from {','.join(BACKENDS)}")
    if args.iters < 1 or args.warmup < 0:
        raise SystemExit("--iters must be >= 1 and --warmup >= 0")
    dtype = jnp.dtype(args.dtype if args.dtype != "auto" else
                      ("float32" if jax.default_backend() == "cpu" else "bfloat16"))
    mosaic = [_ints(config) for config in args.mosaic_blocks.split(";") if config.strip()]
    if not mosaic or any(len(config) != 6 for config in mosaic):
        raise SystemExit(f"--mosaic-blocks takes 6 numbers per config, configs separated by ';', "
                         f"got {args.mosaic_blocks!r}")
    try:
        pallas_blocks = BlockSizes(*_ints(args.pallas_blocks))
        mosaic_configs = [(MgpuBlocks(*config[:3]), MgpuBlocks(*config[3:])) for config in mosaic]
    except (TypeError, ValueError) as err:
        raise SystemExit(f"bad --pallas-blocks or --mosaic-blocks: {err}")
    shapes = {name: model_shape(load_config(name), args) for name in args.shapes.split(",") if name}
    shapes = shapes or {cfg.name: model_shape(cfg, args)}
    device = jax.devices()[0]
    print(f"{device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, {dtype.name}", flush=True)

    notes, runnable = [], []
    for backend in backends:
        reason = skip_reason(backend, dtype, args.pallas_interpret)
        if reason:
            notes.append(f"skipped: {reason}")
        else:
            runnable.append(backend)
    decode_backends = [b for b in runnable if b != "cudnn"]
    if "cudnn" in runnable and args.decode_lengths:
        notes.append("cudnn has no ragged-length decode path here; decode times the other backends")

    train, decode = [], []
    for name, shape in shapes.items():
        train += bench_train(name, shape, train_variants(runnable, pallas_blocks, mosaic_configs), dtype, args, notes)
        decode += bench_decode(name, shape, _ints(args.decode_lengths), decode_backends, dtype, args, notes)
    for note in notes:
        print(f"note: {note}")
    result = dict(device_kind=device.device_kind, platform=jax.default_backend(), jax=jax.__version__,
                  dtype=dtype.name, pallas_blocks=_ints(args.pallas_blocks), mosaic_blocks=mosaic, train=train,
                  decode=decode, notes=notes)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run(main)
