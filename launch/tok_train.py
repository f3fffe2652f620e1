"""Train the byte-level BPE tokenizer on the pretraining shards' train split.

    python -m launch.tok_train --config=tiny        # bundled demo corpus, 4,096 tokens, seconds
    python -m launch.tok_train --config=d20         # FineWeb-Edu shards, 65,536 tokens

Documents are cut to `tokenizer.doc_cap` characters and reading stops after
`tokenizer.max_chars`. SentencePiece holds its training lines in memory, so at most
`tokenizer.max_sentences` lines are kept (a uniform sample, said when it happens). Writes
`tokenizer.model` and `token_bytes.npy` under $NANOCHAT_BASE_DIR/tokenizer; the last line is JSON.
"""
import json
import resource
import sys
import time

import numpy as np
from tqdm import tqdm

from nanochat_jax import paths, report
from nanochat_jax.config import config_from_args
from nanochat_jax.data.shards import iter_documents, shards_for_split
from nanochat_jax.tokenizer import split_for_training, train_tokenizer


def training_sentences(shards, doc_cap: int, max_chars: int, stats: dict):
    """Lines of the train documents until `max_chars` characters have been read, with a progress bar."""
    with tqdm(total=max_chars, unit="char", unit_scale=True, desc="reading", file=sys.stderr) as bar:
        for doc in iter_documents(shards, doc_cap):
            stats["documents"] += 1
            stats["chars"] += len(doc)
            bar.update(len(doc))
            for line in split_for_training(doc):
                stats["sentences"] += 1
                yield line
            if stats["chars"] >= max_chars:
                return


def main(argv=None):
    cfg, _ = config_from_args(argv, description=__doc__)
    t = cfg.tokenizer
    shards = shards_for_split(cfg.data, "train")
    print(f"training a {t.vocab_size:,}-token BPE on {len(shards)} train shards (doc_cap {t.doc_cap:,}, "
          f"max_chars {t.max_chars:,}, at most {t.max_sentences:,} lines kept)", flush=True)
    stats = {"documents": 0, "chars": 0, "sentences": 0}
    start = time.perf_counter()
    tokenizer = train_tokenizer(training_sentences(shards, t.doc_cap, t.max_chars, stats), t.vocab_size,
                                input_sentence_size=t.max_sentences)
    train_time = time.perf_counter() - start
    if stats["sentences"] > t.max_sentences:
        print(f"sampled {t.max_sentences:,} of {stats['sentences']:,} lines to bound memory "
              f"(raise tokenizer.max_sentences to use more)", flush=True)
    out_dir = paths.tokenizer_dir()
    tokenizer.save(out_dir)
    token_bytes = tokenizer.token_bytes()
    regular = token_bytes[token_bytes > 0]
    result = {
        "vocab_size": tokenizer.vocab_size,
        "train_time_s": round(train_time, 2),
        "documents": stats["documents"],
        "chars": stats["chars"],
        "sentences": stats["sentences"],
        "sampled_sentences": min(stats["sentences"], t.max_sentences),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "token_bytes_min": int(regular.min()),
        "token_bytes_max": int(regular.max()),
        "token_bytes_mean": round(float(regular.mean()), 4),
        "token_bytes_std": round(float(np.std(regular)), 4),
        "path": str(out_dir),
    }
    print(f"trained in {train_time:.1f}s on {stats['chars']:,} characters; saved to {out_dir}", flush=True)
    report.log("Tokenizer training", {k: v for k, v in result.items() if k != "path"})
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
