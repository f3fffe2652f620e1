"""Train the byte-level BPE tokenizer on the pretraining shards' train split.

    python -m launch.tok_train --config=tiny        # bundled demo corpus, 4,096 tokens, seconds
    python -m launch.tok_train --config=d20         # FineWeb-Edu shards, 65,536 tokens

Documents are cut to `tokenizer.doc_cap` characters and reading stops after
`tokenizer.max_chars`; documents go to SentencePiece as pieces of at most 4,096 characters.
SentencePiece holds its training pieces in memory, so at most `tokenizer.max_sentences` are kept
(a uniform sample, said when it happens; -1 sizes it to half the RAM, 0 keeps all). Writes
`tokenizer.model` and `token_bytes.npy` under $NANOCHAT_BASE_DIR/tokenizer; the last line is JSON.
"""
import json
import resource
import time

import numpy as np

from launch import run
from nanochat_jax import paths, report
from nanochat_jax.config import config_from_args
from nanochat_jax.data.shards import iter_documents, shards_for_split
from nanochat_jax.tokenizer import max_training_pieces, train_tokenizer, training_sentences


def main(argv=None):
    cfg, _ = config_from_args(argv, description=__doc__)
    t = cfg.tokenizer
    max_pieces = max_training_pieces() if t.max_sentences < 0 else t.max_sentences
    shards = shards_for_split(cfg.data, "train")
    print(f"training a {t.vocab_size:,}-token BPE on {len(shards)} train shards (doc_cap {t.doc_cap:,}, "
          f"max_chars {t.max_chars:,}, at most {max_pieces:,} pieces kept, 0 = all)", flush=True)
    stats = {"documents": 0, "chars": 0, "sentences": 0}
    start = time.perf_counter()
    docs = iter_documents(shards, t.doc_cap)
    tokenizer = train_tokenizer(training_sentences(docs, t.max_chars, stats), t.vocab_size,
                                input_sentence_size=max_pieces, verbose=True)
    train_time = time.perf_counter() - start
    sampled = min(stats["sentences"], max_pieces or stats["sentences"])
    if sampled < stats["sentences"]:
        print(f"sampled {sampled:,} of {stats['sentences']:,} pieces to bound memory "
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
        "sampled_sentences": sampled,
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
    run(main)
