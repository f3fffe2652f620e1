"""Benchmark tokenizer training and encoding against tiktoken's GPT-4 encoder on the same text.

    python -m launch.bench_tokenizer --config=tiny                       # demo corpus, vocab 4,096
    python -m launch.bench_tokenizer --config=d20 --config.data.dir=demo --repeat=13   # ~200 MB, 65,536

Reads the train split as tok_train does (`--repeat=N` cycles over it N times to make a larger
text; repeated text trains the same merges, so this measures time and memory, not quality),
trains, then encodes the val shard with our tokenizer and with cl100k_base, both batched over
threads. Last line: JSON with train time, peak RSS, MB/s for both encoders and bytes/token.
"""
import itertools
import json
import os
import resource
import time


from launch import run
from nanochat_jax.config import config_from_args
from nanochat_jax.data.shards import iter_documents, shards_for_split
from nanochat_jax.tokenizer import max_training_pieces, train_tokenizer, training_sentences
from nanochat_jax.tokenizer_tiktoken import load_tiktoken


def add_arguments(parser):
    parser.add_argument("--repeat", type=int, default=1, help="cycle over the train text this many times")
    parser.add_argument("--tiktoken-dir", default=os.environ.get("NANOCHAT_TIKTOKEN_DIR"),
                        help="folder with cl100k_base.tiktoken, for offline use")
    parser.add_argument("--threads", type=int, default=os.cpu_count())


def throughput(encode_batch, docs, nbytes: int) -> tuple[float, int]:
    start = time.perf_counter()
    rows = encode_batch(docs)
    elapsed = time.perf_counter() - start
    return nbytes / elapsed / 1e6, sum(len(r) for r in rows)


def main(argv=None):
    cfg, args = config_from_args(argv, description=__doc__, add_arguments=add_arguments)
    t = cfg.tokenizer
    max_pieces = max_training_pieces() if t.max_sentences < 0 else t.max_sentences
    train_docs = list(iter_documents(shards_for_split(cfg.data, "train"), t.doc_cap))
    docs = itertools.chain.from_iterable(itertools.repeat(train_docs, args.repeat))
    stats = {"documents": 0, "chars": 0, "sentences": 0}
    start = time.perf_counter()
    tok = train_tokenizer(training_sentences(docs, t.max_chars, stats), t.vocab_size, num_threads=args.threads,
                          input_sentence_size=max_pieces)
    train_time = time.perf_counter() - start
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"trained {tok.vocab_size:,} tokens on {stats['chars'] / 1e6:.1f}M chars "
          f"({stats['sentences']:,} pieces, at most {max_pieces:,} kept, 0 = all) in {train_time:.1f}s, "
          f"peak RSS {peak_rss / 2**30:.2f} GiB", flush=True)

    val_docs = list(iter_documents(shards_for_split(cfg.data, "val")))
    nbytes = sum(len(d.encode("utf-8")) for d in val_docs)
    ours_mbs, ours_tokens = throughput(lambda d: tok.encode(d, num_threads=args.threads), val_docs, nbytes)
    gpt4 = load_tiktoken("cl100k_base", args.tiktoken_dir)
    gpt4_mbs, gpt4_tokens = throughput(lambda d: gpt4.encode_ordinary_batch(d, num_threads=args.threads),
                                       val_docs, nbytes)
    result = {
        "vocab_size": tok.vocab_size, "train_chars": stats["chars"], "train_pieces": stats["sentences"],
        "max_sentences": max_pieces, "train_time_s": round(train_time, 2), "peak_rss_bytes": peak_rss,
        "encode_bytes": nbytes, "threads": args.threads,
        "encode_mb_per_s": {"ours": round(ours_mbs, 2), "gpt4": round(gpt4_mbs, 2)},
        "bytes_per_token": {"ours": round(nbytes / ours_tokens, 4), "gpt4": round(nbytes / gpt4_tokens, 4)},
    }
    print(f"encode {nbytes / 1e6:.1f} MB: ours {ours_mbs:.1f} MB/s, cl100k {gpt4_mbs:.1f} MB/s; bytes/token "
          f"ours {result['bytes_per_token']['ours']}, cl100k {result['bytes_per_token']['gpt4']}", flush=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run(main)
