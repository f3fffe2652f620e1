"""Serve a trained model: the chat page, nanochat's streaming protocol and an OpenAI-compatible API.

    python -m launch.chat_web                                # newest stage's model on http://127.0.0.1:8000
    python -m launch.chat_web --source=sft --slots 16 --host 0.0.0.0 --api-key "$KEY"

One scheduler thread owns the device and decodes every busy slot one token per tick; requests
beyond the slots wait in a queue of --max-waiting, and beyond that get 429. Endpoints: `GET /`,
`POST /chat/completions` (nanochat), `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`,
`GET /metrics`. With --api-key, POST endpoints and /v1/* need `Authorization: Bearer KEY`.
Ctrl-C stops it and prints a JSON summary.
"""
import argparse
import json
import logging

from launch import run
from nanochat_jax.checkpoint import STAGES
from nanochat_jax.engine import Engine
from nanochat_jax.loading import load_model, newest_stage
from nanochat_jax.serving import Scheduler, SlotPool
from nanochat_jax.web.app import create_app
from nanochat_jax.web.server import make_server


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", "--source", choices=STAGES, default=None, help="default: the newest stage present")
    parser.add_argument("-g", "--tag", default=None, help="run tag (default: the most recent of the stage)")
    parser.add_argument("-s", "--step", type=int, default=None)
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--slots", type=int, default=8, help="requests decoded together")
    parser.add_argument("--max-waiting", type=int, default=64, help="requests queued for a slot before 429s")
    parser.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY`")
    args = parser.parse_args(argv)
    if args.slots < 1 or args.max_waiting < 0 or not 0 <= args.port < 65536:
        parser.error("need --slots >= 1, --max-waiting >= 0 and a port in 0..65535")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    source = args.source or newest_stage()
    loaded = load_model(source, args.step, tag=args.tag)
    engine = Engine(loaded.graphdef, loaded.params, loaded.model_cfg, loaded.tokenizer)
    scheduler = Scheduler(SlotPool(engine, args.slots), args.max_waiting).start()
    name = f"nanochat-jax-{source}-{loaded.directory.name}"
    app = create_app(scheduler, loaded.tokenizer, model_name=name, api_key=args.api_key)
    server = make_server(app, args.host, args.port, threads=args.slots + args.max_waiting + 8)
    print(f"{name} (step {loaded.step}, {args.slots} slots, context {loaded.model_cfg.sequence_len}) on "
          f"http://{args.host}:{server.effective_port}", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        scheduler.stop()
    print(json.dumps({"model": name, "step": loaded.step, "slots": args.slots,
                      "tokens_generated": scheduler.tokens_generated}))
    return 0


if __name__ == "__main__":
    run(main)
