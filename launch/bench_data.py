"""Benchmark the pretraining data pipeline: packed tokens/s, rows/s and the fraction of tokens cropped.

    python -m launch.bench_data --config=tiny --workers=2
    python -m launch.bench_data --config=d20 --config.data.dir=demo --seconds=30

Uses the tokenizer in $NANOCHAT_BASE_DIR/tokenizer when its vocabulary is the config's, else trains
a throwaway one of that size on the first 20M characters of the train split (seconds; not saved).
Batches are one device's micro-batch (train.device_batch_size rows) of one process's train stream.
The first batch (worker start-up, buffer fill) is timed apart; throughput counts the batches after
it, for --seconds or --batches. tokens_per_s counts training tokens (rows x sequence_len), as
bench_train does. The last line is one JSON object.
"""
import json
import time

from launch import run
from nanochat_jax import paths
from nanochat_jax.config import config_from_args
from nanochat_jax.data.pretrain import pretrain_loader
from nanochat_jax.data.shards import iter_documents, shards_for_split
from nanochat_jax.tokenizer import Tokenizer, train_tokenizer, training_sentences

THROWAWAY_CHARS = 20_000_000


def add_arguments(parser):
    parser.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: data.num_workers)")
    parser.add_argument("--seconds", type=float, default=20.0, help="time to run after the first batch")
    parser.add_argument("--batches", type=int, default=0, help="run this many batches instead (0: use --seconds)")
    parser.add_argument("--rows", type=int, default=None, help="rows per batch (default: train.device_batch_size)")
    parser.add_argument("--buffer-docs", type=int, default=1000, help="documents buffered for best-fit packing")


def bench_tokenizer(cfg) -> Tokenizer:
    vocab_size = cfg.tokenizer.vocab_size
    try:
        tok = Tokenizer.load(paths.tokenizer_dir())
        if tok.vocab_size == vocab_size:
            print(f"tokenizer: {paths.tokenizer_dir()} ({vocab_size:,} tokens)", flush=True)
            return tok
    except FileNotFoundError:
        pass
    print(f"no {vocab_size:,}-token tokenizer in {paths.tokenizer_dir()}: training a throwaway one on "
          f"{THROWAWAY_CHARS:,} characters of the train split", flush=True)
    t0 = time.perf_counter()
    docs = iter_documents(shards_for_split(cfg.data, "train"), cfg.tokenizer.doc_cap)
    stats = {"documents": 0, "chars": 0, "sentences": 0}
    tok = train_tokenizer(training_sentences(docs, THROWAWAY_CHARS, stats), vocab_size)
    print(f"trained in {time.perf_counter() - t0:.1f}s", flush=True)
    return tok


def main(argv=None):
    cfg, args = config_from_args(argv, description=__doc__, add_arguments=add_arguments)
    tok = bench_tokenizer(cfg)
    rows = args.rows or cfg.train.device_batch_size
    seq_len = cfg.model.sequence_len
    workers = cfg.data.num_workers if args.workers is None else args.workers
    loader = pretrain_loader(cfg, tok, "train", rows, num_workers=workers, buffer_docs=args.buffer_docs)
    print(f"{cfg.name}: {rows} rows x {seq_len + 1} tokens per batch, {workers} worker(s), "
          f"buffer {args.buffer_docs} documents", flush=True)
    with loader:
        t0 = time.perf_counter()
        next(loader)
        first_s = time.perf_counter() - t0
        print(f"first batch: {first_s:.2f}s", flush=True)
        batches, start, last_print = 0, time.perf_counter(), time.perf_counter()
        while (batches < args.batches) if args.batches else (time.perf_counter() - start < args.seconds):
            next(loader)
            batches += 1
            now = time.perf_counter()
            if now - last_print >= 2:
                print(f"{batches} batches, {batches * rows * seq_len / (now - start):,.0f} tok/s, "
                      f"crop {loader.stats()['crop_fraction']:.1%}", flush=True)
                last_print = now
        elapsed = time.perf_counter() - start
    result = {
        "config": cfg.name,
        "tokens_per_s": batches * rows * seq_len / elapsed,
        "rows_per_s": batches * rows / elapsed,
        "crop_fraction": loader.stats()["crop_fraction"],
        "first_batch_s": first_s,
        "batches": batches,
        "workers": workers,
        "seq_len": seq_len,
        "rows": rows,
        "buffer_docs": args.buffer_docs,
        "vocab_size": tok.vocab_size,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run(main)
