"""The pretraining loader: full BOS-aligned rows, best-fit choices, no token lost but the documented
crops, deterministic disjoint per-process shares, exact checkpoint restore, one-pass val."""
import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat_jax.config import load_config
from nanochat_jax.data.packing import BestFitPacker
from nanochat_jax.data.pretrain import PretrainLoader, RowGroupStream, pretrain_loader
from nanochat_jax.data.shards import DEMO_DIR, iter_documents
from nanochat_jax.tokenizer import split_for_training, train_tokenizer

T, ROWS, DOCS_PER_GROUP = 64, 4, 25


@pytest.fixture(scope="module")
def tok():
    docs = list(iter_documents(sorted(DEMO_DIR.glob("*.parquet"))[:1], doc_cap=20000))
    return train_tokenizer((piece for doc in docs for piece in split_for_training(doc)), 512)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """3 shards x 4 row groups x 25 documents of 0..150 characters (up to 600 for one in ten):
    several fit in a row, some are longer than a row, two are empty (BOS alone)."""
    text = "".join(iter_documents(sorted(DEMO_DIR.glob("*.parquet"))[:1]))
    rng = np.random.default_rng(0)
    directory = tmp_path_factory.mktemp("corpus")
    shards = []
    for s in range(3):
        starts, lengths = rng.integers(0, len(text) - 600, 100), rng.integers(0, 150, 100)
        lengths[::10] = rng.integers(150, 600, 10)
        docs = [text[a:a + n] for a, n in zip(starts, lengths)]
        if s == 0:
            docs[3] = docs[60] = ""
        shards.append(directory / f"shard_{s:05d}.parquet")
        pq.write_table(pa.table({"text": docs}), shards[-1], row_group_size=DOCS_PER_GROUP)
    return shards


def loader(corpus, tok, **kwargs):
    return PretrainLoader(corpus, tok, T, ROWS, **{"buffer_docs": 20, **kwargs})


def take(it, n):
    return [next(it) for _ in range(n)]


def pieces(row, bos):
    """A row cut at its BOS tokens: the documents (or the cropped last one) placed in it."""
    starts = list(np.flatnonzero(row == bos)) + [len(row)]
    return [tuple(row[a:b].tolist()) for a, b in zip(starts[:-1], starts[1:])]


def test_rows_are_full_and_start_with_bos(corpus, tok):
    for batch in take(loader(corpus, tok), 10):
        assert batch.shape == (ROWS, T + 1) and batch.dtype == np.int32
        assert (batch[:, 0] == tok.bos_id).all()


def test_best_fit_on_a_hand_made_buffer():
    lengths = [6, 5, 4, 5, 3, 12, 11, 2]  # documents a..h, in arrival order
    docs = [np.array([1] + [10 + k] * (n - 1), dtype=np.int32) for k, n in enumerate(lengths)]  # 1: BOS
    packer = BestFitPacker()
    for k, doc in enumerate(docs):
        packer.add(doc, k)
    rows = np.zeros((4, 10), dtype=np.int32)
    for row in rows:
        filled = 0
        while filled < len(row):
            filled = packer.place(row, filled)
    a, b, c, d, e, f, g, h = docs
    expected = [
        [a, c],           # 6 is the largest that fits 10, then 4 fills it
        [b, d],           # two of length 5: the first to arrive goes first
        [e, h, g[:5]],    # 3, then 2; nothing left fits 5: crop the shortest (11, not 12)
        [f[:10]],         # longer than a row: cropped to it
    ]
    np.testing.assert_array_equal(rows, [np.concatenate(parts) for parts in expected])
    assert len(packer) == 0 and packer.tokens_out == 40 and packer.tokens_cropped == (11 - 5) + (12 - 10)


def test_no_token_lost_but_the_last_document_of_a_row_cropped(corpus, tok):
    """Every document of the row groups read so far is in the rows exactly once (whole, or as the
    cropped last piece of a row) or still in the buffer; nothing else is in the rows."""
    it = loader(corpus, tok, shuffle=False)
    batches = take(it, 12)
    state = it.get_state()
    assert state["epoch"] == 0 and 0 < state["position"] < 12
    files = [pq.ParquetFile(p) for p in corpus]
    texts = [f.read_row_group(g).column("text").to_pylist() for f in files for g in range(f.num_row_groups)]
    read = {(rg, d): tuple(ids) for rg in range(state["position"])
            for d, ids in enumerate(tok.encode(texts[rg], prepend=tok.bos_id))}
    for rg, docs in state["buffer"]:
        for d in docs:
            del read[(rg, d)]
    unplaced = Counter(read.values())
    row_ends, crops, whole = [], [], 0
    for row in (row for batch in batches for row in batch):
        *middle, last = pieces(row, tok.bos_id)
        whole += len(middle)
        for piece in middle:  # only the last piece of a row may be cropped
            assert unplaced[piece] > 0, "a document that is not whole, or placed twice"
            unplaced[piece] -= 1
        row_ends.append(last)
    for piece in row_ends:
        if unplaced[piece] > 0:
            unplaced[piece] -= 1
        else:
            crops.append(piece)
    cropped = 0
    for piece in sorted(crops, key=len, reverse=True):
        doc = next(doc for doc, n in unplaced.items() if n > 0 and len(doc) > len(piece) and doc[:len(piece)] == piece)
        unplaced[doc] -= 1
        cropped += len(doc) - len(piece)
    assert +unplaced == Counter(), "documents read but neither placed nor buffered"
    assert whole > 20 and len(crops) > 10  # the corpus exercises both
    assert it.stats()["tokens_out"] == 12 * ROWS * (T + 1) and it.stats()["tokens_cropped"] == cropped


def test_deterministic_and_different_per_process_and_seed(corpus, tok):
    first = take(loader(corpus, tok, seed=3), 5)
    for batch, again in zip(first, take(loader(corpus, tok, seed=3), 5)):
        np.testing.assert_array_equal(batch, again)
    for other in (loader(corpus, tok, seed=4), loader(corpus, tok, seed=3, process_index=1, process_count=2)):
        assert any((a != b).any() for a, b in zip(first, take(other, 5)))


@pytest.mark.parametrize("count", [2, 3, 5])
def test_process_shares_are_disjoint_and_complete(corpus, tok, count):
    """Per epoch the processes' shares partition the documents (12 row groups over 5 processes:
    uneven shares); a split with fewer row groups than processes (the bundled val) is cut into document slices."""
    for shards in (corpus, [DEMO_DIR / "shard_00008.parquet"]):
        streams = [RowGroupStream(shards, tok.model_proto, process_index=p, process_count=count, seed=0,
                                  shuffle=True, threads=1) for p in range(count)]
        everything = {(rg, d) for rg, (_, _, n) in enumerate(streams[0].groups) for d in range(n)}
        orders = []
        for epoch in range(2):
            seen = []
            for stream in streams:
                for pos in range(epoch * stream.share_len, (epoch + 1) * stream.share_len):
                    rg, s, slices = stream.unit_at(pos)
                    seen += [(rg, d) for d in range(s, stream.groups[rg][2], slices)]
            assert len(seen) == len(set(seen)) and set(seen) == everything
            orders.append(seen)
        assert shards != corpus or orders[0] != orders[1], "each epoch has its own order of the 12 row groups"


def test_a_process_without_documents_is_an_error(tok):
    with pytest.raises(ValueError, match="no documents"):
        # 3 row groups of at most 1,024 documents, cut into 3,334 slices each: the last slice is empty
        PretrainLoader([DEMO_DIR / "shard_00008.parquet"], tok, T, ROWS, process_index=9999, process_count=10000)


def _check_restore(corpus, tok, num_workers):
    """Save after 5 batches and after 85 (the second epoch), restore each into a fresh loader."""
    run, states = [], {}
    with loader(corpus, tok, num_workers=num_workers) as original:
        for k in (5, 85, 90):
            run += take(original, k - len(run))
            states[k] = json.loads(json.dumps(original.get_state()))
    assert states[85]["epoch"] >= 1 and len(json.dumps(states[85])) < 2000
    for k in (5, 85):
        with loader(corpus, tok, num_workers=num_workers) as restored:
            restored.set_state(states[k])
            for a, b in zip(run[k:k + 5], take(restored, 5)):
                np.testing.assert_array_equal(a, b)
    return run


def test_restore_is_exact(corpus, tok):
    _check_restore(corpus, tok, num_workers=0)


@pytest.mark.slow
def test_restore_is_exact_with_workers_and_workers_change_nothing(corpus, tok):
    with_workers = _check_restore(corpus, tok, num_workers=2)
    for a, b in zip(with_workers, take(loader(corpus, tok), 90)):
        np.testing.assert_array_equal(a, b)


def test_one_pass_stops_and_repeats(corpus, tok):
    runs = []
    for _ in range(2):
        it = loader(corpus, tok, loop=False)
        runs.append(list(it))
        with pytest.raises(StopIteration):
            next(it)
        state = it.get_state()
        assert state["buffer"] == [] and (state["epoch"], state["position"]) == (1, 0)
    assert len(runs[0]) > 10 and all((a == b).all() for a, b in zip(*runs))


def test_pretrain_loader_of_a_config(tok):
    cfg = load_config("tiny")
    val = pretrain_loader(cfg, tok, "val", rows=2, num_workers=0, buffer_docs=10)
    batch = next(val)
    assert batch.shape == (2, cfg.model.sequence_len + 1) and (batch[:, 0] == tok.bos_id).all()
    assert not val.loop
    batches = 1 + sum(1 for _ in val)  # one pass over the val shard, then StopIteration
    assert 100 < batches < 5000 and next(val, None) is None
