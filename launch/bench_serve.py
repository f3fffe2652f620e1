"""Continuous batching under load: N concurrent streaming clients against a live server on
loopback, against one client at a time and against the single-request engine, same model and prompts.

    python -m launch.bench_serve --source=base --clients=16 --requests=64 --max-tokens=64
    python -m launch.bench_serve --config=tiny --random-weights     # no checkpoint: the config's shape

The server runs in this process on a free 127.0.0.1 port. Each client streams from
/v1/chat/completions and records time to first token (TTFT), time per output token after it
(TPOT) and its token count (usage). Everything is bounded: --requests in all, --time-limit seconds
per phase. Prints requests/s, aggregate tokens/s, TTFT and TPOT p50/p95 and errors per phase;
the last line is JSON.
"""
import concurrent.futures
import http.client
import json
import time

import jax
import numpy as np

from launch import run
from nanochat_jax import model as model_lib
from nanochat_jax import paths
from nanochat_jax.checkpoint import STAGES
from nanochat_jax.config import config_from_args
from nanochat_jax.engine import Engine
from nanochat_jax.loading import load_model
from nanochat_jax.serving import Scheduler, SlotPool
from nanochat_jax.tokenizer import Tokenizer
from nanochat_jax.web.app import create_app
from nanochat_jax.web.server import BackgroundServer

TOPICS = ["the sea", "a whale", "the king", "winter", "the law", "a ship", "the moon", "bread", "a letter",
          "the war", "a garden", "the river", "a storm", "the union", "a song", "the harbour"]


def add_arguments(parser):
    parser.add_argument("-i", "--source", choices=STAGES, default="base")
    parser.add_argument("--random-weights", action="store_true", help="random weights of --config's model shape")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64, help="requests in the concurrent phase")
    parser.add_argument("--single-requests", type=int, default=8, help="requests one at a time (server, engine)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--slots", type=int, default=None, help="default: --clients")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds per phase")


def load(cfg, args):
    if not args.random_weights:
        loaded = load_model(args.source)
        return loaded.graphdef, loaded.params, loaded.model_cfg, loaded.tokenizer
    model_cfg = model_lib.GPTConfig.from_config(cfg.model)
    graphdef, _, _ = model_lib.abstract_model(model_cfg)
    return graphdef, model_lib.init_params(model_cfg, jax.random.key(0)), model_cfg, Tokenizer.load(paths.tokenizer_dir())


def stream_one(url: str, text: str, args, seed: int) -> dict:
    """One streaming request: {ttft, tpot, tokens, seconds} or {error}."""
    host = url.removeprefix("http://")
    body = json.dumps({"messages": [{"role": "user", "content": text}], "max_tokens": args.max_tokens,
                       "temperature": args.temperature, "seed": seed, "stream": True,
                       "stream_options": {"include_usage": True}})
    start = time.perf_counter()
    first = usage = None
    try:
        connection = http.client.HTTPConnection(host, timeout=args.time_limit)
        connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            return {"error": f"HTTP {response.status}"}
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if first is None and event["choices"] and event["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
            usage = event.get("usage") or usage
        connection.close()
    except (OSError, http.client.HTTPException) as err:
        return {"error": repr(err)}
    end = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else 0
    if first is None or tokens < 1:
        return {"error": "no tokens"}
    return {"ttft": first - start, "tpot": (end - first) / max(tokens - 1, 1), "tokens": tokens, "seconds": end - start}


def phase(name: str, requests: int, clients: int, one, time_limit: float) -> dict:
    """Run `requests` calls of `one(i)` over `clients` threads until done or `time_limit`."""
    deadline, results = time.perf_counter() + time_limit, []
    start = time.perf_counter()

    def worker(c):
        for i in range(c, requests, clients):
            if time.perf_counter() > deadline:
                return
            results.append(one(i))
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    wall = time.perf_counter() - start
    done = [r for r in results if "error" not in r]
    pct = lambda key, q: round(float(np.percentile([r[key] for r in done], q)), 4) if done else None
    summary = {"requests": len(results), "errors": len(results) - len(done), "wall_s": round(wall, 3),
               "requests_per_s": round(len(done) / wall, 3), "tokens_per_s": round(sum(r["tokens"] for r in done) / wall, 2),
               "ttft_p50_s": pct("ttft", 50), "ttft_p95_s": pct("ttft", 95), "tpot_p50_s": pct("tpot", 50),
               "tpot_p95_s": pct("tpot", 95)}
    print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in summary.items()), flush=True)
    return summary


def main(argv=None):
    cfg, args = config_from_args(argv, description=__doc__, add_arguments=add_arguments)
    if args.clients < 1 or args.requests < 1 or args.max_tokens < 1 or args.time_limit <= 0:
        raise SystemExit("error: need --clients, --requests, --max-tokens >= 1 and --time-limit > 0")
    graphdef, params, model_cfg, tok = load(cfg, args)
    engine = Engine(graphdef, params, model_cfg, tok)
    scheduler = Scheduler(SlotPool(engine, args.slots or args.clients), max_waiting=args.requests).start()
    prompt = lambda i: f"Tell me about {TOPICS[i % len(TOPICS)]}, please ({i})."
    chat_ids = lambda i: [tok.bos_id, tok.encode_special("<|user_start|>"), *tok.encode(prompt(i)),
                          tok.encode_special("<|user_end|>"), tok.encode_special("<|assistant_start|>")]

    def engine_one(i):
        start, first, tokens = time.perf_counter(), None, 0
        for _ in engine.generate(chat_ids(i), max_tokens=args.max_tokens, temperature=args.temperature, seed=i):
            first, tokens = first or time.perf_counter(), tokens + 1
        end = time.perf_counter()
        return {"ttft": first - start, "tpot": (end - first) / max(tokens - 1, 1), "tokens": tokens,
                "seconds": end - start}

    try:
        with BackgroundServer(create_app(scheduler, tok), threads=args.clients + 8) as url:
            stream_one(url, prompt(0), args, 0)  # compile the prefill bucket and the decode step
            engine_one(0)
            results = {"engine": phase("engine, one request at a time", args.single_requests, 1, engine_one,
                                       args.time_limit),
                       "server_1": phase("server, 1 client", args.single_requests, 1,
                                         lambda i: stream_one(url, prompt(i), args, i), args.time_limit),
                       f"server_{args.clients}": phase(f"server, {args.clients} clients", args.requests, args.clients,
                                                       lambda i: stream_one(url, prompt(i), args, i), args.time_limit)}
    finally:
        scheduler.stop()
    single, many = results["server_1"]["tokens_per_s"], results[f"server_{args.clients}"]["tokens_per_s"]
    print(json.dumps({"clients": args.clients, "slots": args.slots or args.clients, "max_tokens": args.max_tokens,
                      "speedup_vs_1_client": round(many / single, 2) if single else None, **results}))
    return 0


if __name__ == "__main__":
    run(main)
