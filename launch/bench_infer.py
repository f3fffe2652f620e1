"""Benchmark the inference engine's jitted steps on one device: prefill tokens/s, decode tokens/s at
batch 1 and 16, and how close a decode step comes to its memory-bandwidth floor.

    python -m launch.bench_infer --config=tiny
    python -m launch.bench_infer --config=d20 --prompt_len=64 --steps=5

Weights are random (speed does not depend on them; lm_head and every c_proj, which init_params
zeroes, get small random values so the logits are not trivial). The prompt is `--prompt_len`
tokens (default: half the context). A decode step must read every weight once (of the embedding
table, only the looked-up rows) and, as the model's cached attention is written, every slot of
the KV cache, so its floor is those bytes over the device's memory bandwidth (None where the
bandwidth is unknown, e.g. on CPU: the bytes are reported anyway). Compilation and `--warmup`
steps are not timed; times are medians. The last line is one JSON object.
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
from nanochat_jax.tokenizer import SPECIAL_IDS

BATCHES = (1, 16)

def add_arguments(parser):
    parser.add_argument("--prompt_len", type=int, default=0, help="prompt tokens (0: half the context)")
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps per batch size")
    parser.add_argument("--prefill_reps", type=int, default=3, help="timed prefills")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls after compilation")


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


def main(argv=None):
    cfg, args = config_from_args(argv, description=__doc__, add_arguments=add_arguments)
    model_cfg = model_lib.GPTConfig.from_config(cfg.model)
    prompt_len = args.prompt_len or model_cfg.sequence_len // 2
    if min(args.steps, args.prefill_reps) < 1 or args.warmup < 0 or prompt_len < 1:
        raise SystemExit("--steps and --prefill_reps must be >= 1, --warmup >= 0, --prompt_len >= 1")
    if prompt_len + args.warmup + args.steps > model_cfg.sequence_len:
        raise SystemExit(f"--prompt_len {prompt_len} + --warmup {args.warmup} + --steps {args.steps} exceed the "
                         f"context of {model_cfg.sequence_len}")
    device = jax.devices()[0]
    result = {
        "config": cfg.name, "device_kind": device.device_kind, "num_params": model_lib.num_params(model_cfg),
        "compute_dtype": model_cfg.compute_dtype, "prompt_len": prompt_len,
        "memory_bandwidth": hardware.memory_bandwidth(device),
    }
    print(f"{cfg.name}: {result['num_params']:,} params, compute {model_cfg.compute_dtype}, 1 x {device.device_kind}, "
          f"prompt {prompt_len} tokens", flush=True)

    graphdef, _, _ = model_lib.abstract_model(model_cfg)
    # generate() is not run, so the tokenizer's special ids are all the engine needs
    tokenizer = types.SimpleNamespace(bos_id=SPECIAL_IDS["<|bos|>"], encode_special=SPECIAL_IDS.__getitem__)
    engine = Engine(graphdef, random_params(model_cfg, cfg.seed), model_cfg, tokenizer)
    params = engine.params
    rng = np.random.default_rng(cfg.seed)

    bucket = engine.bucket(prompt_len)
    prompt = np.zeros((1, bucket), np.int32)
    prompt[0, :prompt_len] = rng.integers(0, model_cfg.vocab_size, prompt_len)
    prefill = lambda: jax.block_until_ready(engine.prefill(params, prompt, prompt_len))
    t0 = time.perf_counter()
    prefill()
    print(f"prefill: compile + first call {time.perf_counter() - t0:.2f}s (bucket {bucket})", flush=True)
    prefill_s = timed(prefill, args.prefill_reps, args.warmup)
    result.update(prefill_bucket=bucket, prefill_s=prefill_s, prefill_tokens_per_s=prompt_len / prefill_s)
    print(f"prefill: {prefill_s * 1000:.1f} ms, {prompt_len / prefill_s:,.0f} tokens/s", flush=True)

    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))  # in the compute dtype, as the engine holds them
    cache_len = engine.bucket(prompt_len + args.warmup + args.steps)
    result.update(param_bytes=param_bytes, cache_len=cache_len)
    for batch in BATCHES:
        state = {"cache": engine.empty_cache(batch, cache_len), "position": prompt_len}
        tokens = rng.integers(0, model_cfg.vocab_size, (batch, 1)).astype(np.int32)

        def step():
            positions = np.full(batch, state["position"], np.int32)
            logits, state["cache"] = engine.decode_step(params, tokens, state["cache"], positions)
            state["position"] += 1
            jax.block_until_ready(logits)

        t0 = time.perf_counter()
        step()
        compile_s = time.perf_counter() - t0
        state["position"] = prompt_len  # the timed steps walk from the prompt's end
        step_s = timed(step, args.steps, args.warmup)
        cache_bytes = sum(x.nbytes for x in state["cache"].values())
        row_bytes = params["wte"].nbytes // model_cfg.vocab_size
        step_bytes = param_bytes - params["wte"].nbytes + batch * row_bytes + cache_bytes
        bandwidth = result["memory_bandwidth"]
        floor_s = None if bandwidth is None else step_bytes / bandwidth
        result.update({f"decode_step_s_b{batch}": step_s, f"decode_tokens_per_s_b{batch}": batch / step_s,
                       f"decode_bytes_b{batch}": step_bytes, f"cache_bytes_b{batch}": cache_bytes,
                       f"decode_floor_s_b{batch}": floor_s})
        floor_text = "n/a (bandwidth unknown)" if floor_s is None else (
            f"{floor_s * 1000:.2f} ms ({100 * floor_s / step_s:.0f}% of it)")
        print(f"decode batch {batch}: compile {compile_s:.2f}s | {step_s * 1000:.2f} ms/step | "
              f"{batch / step_s:,.0f} tokens/s | reads {step_bytes / 1e6:,.1f} MB/step, floor {floor_text}", flush=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run(main)
