"""Benchmark the inference engine on one device: prefill tokens/s, the jitted decode step at each
cache capacity (256 slots up to the context) for 1 and 16 rows, and whole generations.

    python -m launch.bench_infer --config=tiny
    python -m launch.bench_infer --config=tiny --config.model.sequence_len=2048
    python -m launch.bench_infer --config=d20 --prompt_len=64 --steps=5

Weights are random (speed does not depend on them; lm_head and every c_proj, which init_params
zeroes, get small random values so the logits are not trivial). Every decode step runs at the
same valid length (`--prompt_len` onwards) whatever the capacity, so the capacity sweep shows
what a large preallocated cache (the serving slots) costs before it is filled: ideally nothing.
A decode step must read every weight once (of the embedding table, only the looked-up rows) and
the cache slots its attention reads (the engine's bucketed bound of the valid length), so its
floor is those bytes over the device's memory bandwidth (None where it is unknown, e.g. on CPU:
the bytes are reported anyway). `generate` times `Engine.generate_batch`: `--samples` rows of
`--new_tokens` each (temperature 1, top-k 50, stop tokens outside the vocabulary so that every
row runs to the end), prefill and host loop included. Compilation and `--warmup` calls are not
timed; times are medians. The last line is one JSON object.
"""
import json
import statistics
import time
import types

import jax
import numpy as np

from launch import run
from nanochat_jax import hardware
from nanochat_jax import model as model_lib
from nanochat_jax.config import config_from_args
from nanochat_jax.engine import Engine
from nanochat_jax.tokenizer import SPECIAL_TOKENS

BATCHES = (1, 16)


def add_arguments(parser):
    parser.add_argument("--prompt_len", type=int, default=64, help="prompt tokens, the valid length decode starts at")
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps per batch size and capacity")
    parser.add_argument("--prefill_reps", type=int, default=3, help="timed prefills")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls after compilation")
    parser.add_argument("--samples", type=int, default=16, help="rows of the timed generation (0: skip it)")
    parser.add_argument("--new_tokens", type=int, default=128, help="tokens per row of the timed generation")


def random_params(model_cfg, seed: int):
    """init_params, with the zero-initialised kernels (lm_head, c_proj) made small and random."""
    params = model_lib.init_params(model_cfg, jax.random.key(seed))
    paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(paths))
    leaves = [0.5 * x.shape[0] ** -0.5 * jax.random.normal(k, x.shape)
              if any(name in jax.tree_util.keystr(path) for name in ("lm_head", "c_proj")) else x
              for (path, x), k in zip(paths, keys)]
    return jax.tree.unflatten(treedef, leaves)


def timed(fn, reps: int, warmup: int) -> float:
    """Median wall time of `fn()` (which blocks until its result is ready) after warmup calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def capacities(context: int) -> list[int]:
    """256, 512, ... below the context, then the context."""
    return sorted({256 * 2**i for i in range(context.bit_length()) if 256 * 2**i < context} | {context})


def main(argv=None):
    cfg, args = config_from_args(argv, description=__doc__, add_arguments=add_arguments)
    model_cfg = model_lib.GPTConfig.from_config(cfg.model)
    context, prompt_len = model_cfg.sequence_len, args.prompt_len
    if min(args.steps, args.prefill_reps, prompt_len) < 1 or min(args.warmup, args.samples, args.new_tokens) < 0:
        raise SystemExit("--steps, --prefill_reps and --prompt_len must be >= 1; --warmup, --samples and "
                         "--new_tokens >= 0")
    if prompt_len + max(args.warmup + args.steps, args.new_tokens) > context:
        raise SystemExit(f"--prompt_len {prompt_len} + the decode steps ({args.warmup} + {args.steps}) or "
                         f"--new_tokens {args.new_tokens} exceed the context of {context}")
    device = jax.devices()[0]
    result = {
        "config": cfg.name, "device_kind": device.device_kind, "num_params": model_lib.num_params(model_cfg),
        "compute_dtype": model_cfg.compute_dtype, "prompt_len": prompt_len,
        "memory_bandwidth": hardware.memory_bandwidth(device),
    }
    print(f"{cfg.name}: {result['num_params']:,} params, compute {model_cfg.compute_dtype}, 1 x {device.device_kind}, "
          f"prompt {prompt_len} tokens, context {context}", flush=True)

    graphdef, _, _ = model_lib.abstract_model(model_cfg)
    # special ids past the vocabulary: random weights never stop a row or open a python block
    tokenizer = types.SimpleNamespace(bos_id=model_cfg.vocab_size,
                                      encode_special=lambda name: model_cfg.vocab_size + SPECIAL_TOKENS.index(name))
    engine = Engine(graphdef, random_params(model_cfg, cfg.seed), model_cfg, tokenizer)
    params = engine.params
    rng = np.random.default_rng(cfg.seed)
    prompt_tokens = rng.integers(0, model_cfg.vocab_size, prompt_len).tolist()

    bucket = engine.bucket(prompt_len)
    prompt = np.zeros((1, bucket), np.int32)
    prompt[0, :prompt_len] = prompt_tokens
    prefill = lambda: jax.block_until_ready(engine.prefill(params, prompt, prompt_len))
    t0 = time.perf_counter()
    prefill()
    print(f"prefill: compile + first call {time.perf_counter() - t0:.2f}s (bucket {bucket})", flush=True)
    prefill_s = timed(prefill, args.prefill_reps, args.warmup)
    result.update(prefill_bucket=bucket, prefill_s=prefill_s, prefill_tokens_per_s=prompt_len / prefill_s)
    print(f"prefill: {prefill_s * 1000:.1f} ms, {prompt_len / prefill_s:,.0f} tokens/s", flush=True)

    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))  # in the compute dtype, as the engine holds them
    row_bytes = params["wte"].nbytes // model_cfg.vocab_size
    slot_bytes = 2 * model_cfg.n_layer * model_cfg.n_kv_head * model_cfg.head_dim * model_cfg.dtype.itemsize
    result.update(param_bytes=param_bytes, decode=[])
    bandwidth = result["memory_bandwidth"]
    for batch in BATCHES:
        for capacity in capacities(context):
            if capacity < prompt_len + args.warmup + args.steps:
                continue
            state = {"cache": engine.empty_cache(batch, capacity), "position": prompt_len}
            tokens = rng.integers(0, model_cfg.vocab_size, (batch, 1)).astype(np.int32)

            def step():
                position = state["position"]
                logits, state["cache"] = engine.decode_step(params, tokens, state["cache"],
                                                            np.full(batch, position, np.int32),
                                                            kv_len=engine.bucket(position + 1))
                state["position"] += 1
                jax.block_until_ready(logits)

            t0 = time.perf_counter()
            step()
            compile_s = time.perf_counter() - t0
            state["position"] = prompt_len  # the timed steps walk from the prompt's end
            step_s = timed(step, args.steps, args.warmup)
            kv_len = engine.bucket(state["position"])
            step_bytes = param_bytes - params["wte"].nbytes + batch * (row_bytes + kv_len * slot_bytes)
            floor_s = None if bandwidth is None else step_bytes / bandwidth
            result["decode"].append(dict(rows=batch, capacity=capacity, kv_len=kv_len, step_s=step_s,
                                         tokens_per_s=batch / step_s, bytes=step_bytes, floor_s=floor_s))
            floor_text = "n/a (bandwidth unknown)" if floor_s is None else (
                f"{floor_s * 1000:.2f} ms ({100 * floor_s / step_s:.0f}% of it)")
            print(f"decode {batch:>2} rows, capacity {capacity:>5}: compile {compile_s:.2f}s | {step_s * 1000:.2f} "
                  f"ms/step | {batch / step_s:,.0f} tokens/s | reads {step_bytes / 1e6:,.1f} MB/step, floor "
                  f"{floor_text}", flush=True)

    if args.samples and args.new_tokens:
        generate = lambda: engine.generate_batch(prompt_tokens, args.samples, max_tokens=args.new_tokens,
                                                 temperature=1.0, top_k=50, seed=cfg.seed)
        generate()  # compiles
        generate_s = timed(generate, 1, 0)
        tokens_per_s = args.samples * args.new_tokens / generate_s
        result.update(generate_s=generate_s, generate_tokens_per_s=tokens_per_s)
        print(f"generate: {args.samples} x {args.new_tokens} tokens in {generate_s:.2f}s, {tokens_per_s:,.0f} "
              "tokens/s", flush=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run(main)
