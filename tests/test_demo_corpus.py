"""The bundled demo corpus: nanochat's shard layout, cut into documents that fit short contexts."""
import numpy as np

from launch.make_demo_corpus import cut_paragraphs
from nanochat_jax.data.shards import DEMO_DIR, iter_documents, list_shards, split_shards


def test_cut_paragraphs_keeps_text_and_bounds_pieces():
    text = "a" * 10 + "\n\n" + "b" * 30 + "\n" + "c" * 5 + ". " + "d" * 8 + "\n\n" + "e" * 3
    pieces = cut_paragraphs(text, 12)
    assert pieces == ["a" * 10, "b" * 30, "c" * 5, "d" * 8, "e" * 3]  # 30 b's: no separator inside
    assert cut_paragraphs("short\n\ntext", 100) == ["short\n\ntext"]
    assert cut_paragraphs("one\n\ntwo\n\nthree", 8) == ["one\n\ntwo", "three"]
    assert cut_paragraphs("  \n\n ", 2) == []


def test_bundled_corpus_layout():
    shards = list_shards(DEMO_DIR)
    assert [p.name for p in shards] == [f"shard_{i:05d}.parquet" for i in range(9)]
    train, val = split_shards(shards, "shard_00008.parquet")
    assert len(train) == 8 and val.name == "shard_00008.parquet"
    lengths = np.array([len(d) for d in iter_documents(shards)])
    assert 16_000_000 < lengths.sum() < 17_100_000
    assert np.median(lengths) < 800 and np.mean(lengths > 800) < 0.01  # a rare unbreakable line is longer
