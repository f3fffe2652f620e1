"""Rebuild the bundled demo corpus (nanochat_jax/data/demo_corpus) from its source shards.

    python -m launch.make_demo_corpus --src ../shared/datasets/demo_corpus

The source documents are whole books, plays and speeches (median ~6K characters, up to 217K).
Packed into tiny's 257-token rows, best-fit packing keeps only each document's first row and
crops ~90% of the text away. So each document is cut at paragraph breaks (then line breaks, then
sentence ends) into pieces of at most `--max-chars` characters, keeping order and the shard
layout: same shard names (the last is still the val split), one `text` column, zstd, row groups
of 1,024 documents. The text itself is unchanged.
"""
import argparse
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat_jax.data.shards import DEMO_DIR, iter_documents, list_shards


def cut_paragraphs(text: str, max_chars: int, separators=("\n\n", "\n", ". ")) -> list[str]:
    """Consecutive runs of whole paragraphs of at most max_chars; a longer paragraph is cut at
    line breaks, then at sentence ends. Joining the pieces with their separators gives the text."""
    if len(text) <= max_chars or not separators:
        return [text] if text.strip() else []
    sep, finer = separators[0], separators[1:]
    pieces, current = [], ""
    for part in text.split(sep):
        candidate = f"{current}{sep}{part}" if current else part
        if len(candidate) <= max_chars:
            current = candidate
            continue
        if current.strip():
            pieces.append(current)
        if len(part) > max_chars:
            *whole, current = cut_paragraphs(part, max_chars, finer) or [""]
            pieces += whole
        else:
            current = part
    if current.strip():
        pieces.append(current)
    return pieces


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="folder of source shards")
    parser.add_argument("--out", default=str(DEMO_DIR))
    parser.add_argument("--max-chars", type=int, default=800)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    totals = {"shards": 0, "documents": 0, "chars": 0}
    for shard in list_shards(Path(args.src)):
        docs = [piece for doc in iter_documents([shard]) for piece in cut_paragraphs(doc, args.max_chars)]
        tmp = out / (shard.name + ".tmp")
        pq.write_table(pa.table({"text": docs}), tmp, row_group_size=1024, compression="zstd")
        tmp.replace(out / shard.name)
        totals["shards"] += 1
        totals["documents"] += len(docs)
        totals["chars"] += sum(map(len, docs))
        print(f"{shard.name}: {len(docs):,} documents", flush=True)
    print(json.dumps(totals))


if __name__ == "__main__":
    main()
