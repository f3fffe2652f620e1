"""Pretraining batches: parquet row groups, tokenized in worker processes, packed best-fit into
BOS-aligned rows of sequence_len + 1 tokens (nanochat's improved loader), with an exact checkpoint.

Row groups are the unit of work. They are numbered over all shards in order; each epoch they are
permuted by a permutation of (seed, epoch), the same in every process (or kept in order with
`shuffle=False`, as val is), and process p of P reads positions p, p+P, p+2P, ... of that order,
so the processes' shares are disjoint and together cover every row group once per epoch. With
fewer row groups than processes (the bundled val shard has three) each row group is cut
into interleaved document slices, so every process still gets a share.

The unit stream is a pure function of its position and grain returns units in order whatever the
number of workers, so batches depend on the data, tokenizer, seed, process index and count,
seq_len, rows and buffer_docs, never on num_workers. A checkpoint is the stream position plus a
(row group, document) reference per buffered document (buffered documents are always whole);
restoring re-reads and re-tokenizes just those documents and rebuilds the buffer in its order,
so the following batches are exactly those the original run produced.
"""
import itertools
import os
from collections.abc import Sequence
from pathlib import Path

import grain
import jax
import numpy as np
import pyarrow.parquet as pq
from absl import flags

from nanochat_jax.data.packing import BestFitPacker
from nanochat_jax.data.shards import shards_for_split
from nanochat_jax.tokenizer import Tokenizer


class RowGroupStream:
    """This process's work units in stream order; calling it with a position reads and tokenizes one.

    A unit is (row group, slice, slices): the row group's documents slice::slices (one slice unless
    there are fewer row groups than processes). Picklable (both tokenizers are), because grain
    sends it to the workers.
    """

    def __init__(self, shards: Sequence[Path], tokenizer, *, process_index: int, process_count: int,
                 seed: int, shuffle: bool, threads: int):
        self.groups = []  # (shard, row group in that file, documents)
        for path in shards:
            meta = pq.ParquetFile(path).metadata
            self.groups += [(str(path), g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
        slices = -(-process_count // len(self.groups)) if self.groups else 1
        self.units = [(rg, s, slices) for rg in range(len(self.groups)) for s in range(slices)]
        share = self.units[process_index::process_count]
        if not sum(len(range(s, self.groups[rg][2], n)) for rg, s, n in share):
            raise ValueError(f"process {process_index} of {process_count} gets no documents from "
                             f"{len(self.groups)} row groups in {len(shards)} shards")
        self.share_len = len(share)
        self.tokenizer, self.process_index, self.process_count = tokenizer, process_index, process_count
        self.seed, self.shuffle, self.threads = seed, shuffle, threads
        self._order = (None, None)  # (epoch, permutation), the last one used

    def unit_at(self, position: int) -> tuple[int, int, int]:
        epoch, i = divmod(position, self.share_len)
        index = self.process_index + i * self.process_count
        if not self.shuffle:
            return self.units[index]
        if self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.units)))
        return self.units[self._order[1][index]]

    def read(self, rg: int, docs: Sequence[int]) -> list[str]:
        path, group, _ = self.groups[rg]
        texts = pq.ParquetFile(path).read_row_group(group, columns=["text"]).column("text").to_pylist()
        return [texts[d] for d in docs]

    def tokenize(self, texts: list[str], threads: int) -> tuple[np.ndarray, np.ndarray]:
        """All documents' tokens, BOS first in each, concatenated, and their offsets (len + 1)."""
        ids = self.tokenizer.encode(texts, prepend=self.tokenizer.bos_id, num_threads=threads) if texts else []
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum([len(x) for x in ids], out=offsets[1:])
        return np.fromiter(itertools.chain.from_iterable(ids), np.int32, offsets[-1]), offsets

    def __call__(self, position: int) -> dict:
        """The unit at a stream position, read and tokenized: what a worker returns."""
        rg, s, slices = self.unit_at(position)
        docs = np.arange(s, self.groups[rg][2], slices)
        tokens, offsets = self.tokenize(self.read(rg, docs), self.threads)
        return {"rg": rg, "docs": docs, "tokens": tokens, "offsets": offsets}


class PretrainLoader:
    """An iterator of int32 (rows, seq_len + 1) batches: this process's share of a training step.

    Every row is full and starts with BOS; callers take inputs = batch[:, :-1], targets = batch[:, 1:].
    Before each document is placed the buffer is topped up to `buffer_docs` documents, a whole row
    group at a time. `loop=False` makes one pass and then raises StopIteration (a partly filled
    last batch is dropped). `get_state()` / `set_state()` checkpoint between batches, exactly.
    """

    def __init__(self, shards: Sequence[Path], tokenizer: Tokenizer, seq_len: int, rows: int, *,
                 process_index: int = 0, process_count: int = 1, seed: int = 0, num_workers: int = 0,
                 buffer_docs: int = 1000, loop: bool = True, shuffle: bool = True):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
        if min(seq_len, rows, buffer_docs) < 1 or num_workers < 0:
            raise ValueError("seq_len, rows and buffer_docs must be >= 1 and num_workers >= 0")
        threads = 0 if num_workers == 0 else max(1, (os.cpu_count() or 1) // num_workers)  # 0: every core
        self._source = RowGroupStream(shards, tokenizer, process_index=process_index,
                                      process_count=process_count, seed=seed, shuffle=shuffle, threads=threads)
        self.row_len, self.rows, self.num_workers = seq_len + 1, rows, num_workers
        self.buffer_docs, self.loop = buffer_docs, loop
        self._packer = BestFitPacker()
        self._next_unit = 0  # stream position of the next unit to enter the buffer
        self._iterator = None  # grain iterator from _next_unit on, opened when first needed

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        batch = np.empty((self.rows, self.row_len), dtype=np.int32)
        for row in batch:
            filled = 0
            while filled < self.row_len:
                while len(self._packer) < self.buffer_docs and self._refill():
                    pass
                if not len(self._packer):
                    raise StopIteration
                filled = self._packer.place(row, filled)
        return batch

    # ---- the row-group stream -----------------------------------------------------------------
    def _refill(self) -> bool:
        """Move the next unit's documents into the buffer; False once a one-pass stream is done."""
        if not self.loop and self._next_unit >= self._source.share_len:
            return False
        if self._iterator is None:
            self._iterator = self._open(self._next_unit)
        unit = next(self._iterator)
        self._buffer(unit["rg"], unit["docs"], unit["tokens"], unit["offsets"])
        self._next_unit += 1
        if not self.loop and self._next_unit == self._source.share_len:
            self.close()
        return True

    def _buffer(self, rg: int, docs, tokens: np.ndarray, offsets: np.ndarray) -> None:
        """Add documents to the packing buffer, each as its own array: a long document that waits
        in the buffer then holds only its own tokens, not its whole row group's (or grain's shared memory)."""
        for doc, start, end in zip(docs, offsets[:-1], offsets[1:]):
            self._packer.add(np.array(tokens[start:end]), (int(rg), int(doc)))

    def _open(self, start: int):
        stop = 2 ** 62 if self.loop else self._source.share_len
        ds = grain.MapDataset.range(start, stop).map(self._source)
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
        if self.num_workers:
            # grain 0.2.18 reads an absl flag when it starts workers, which fails in programs that
            # never parse absl flags (google/grain#1355); nothing here uses absl flags otherwise.
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.num_workers))
        return iter(ds)

    def close(self) -> None:
        """Stop the workers (they restart from the same position if iteration goes on)."""
        if self._iterator is not None:
            self._iterator.close()
            self._iterator = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- checkpoints and statistics -----------------------------------------------------------
    def get_state(self) -> dict:
        """A JSON-serialisable state; after `set_state` of it the same batches follow."""
        buffer = []  # [row group, [documents]] runs, in buffer order
        for rg, doc in self._packer.refs():
            if buffer and buffer[-1][0] == rg:
                buffer[-1][1].append(doc)
            else:
                buffer.append([rg, [doc]])
        epoch, position = divmod(self._next_unit, self._source.share_len)
        return {"epoch": epoch, "position": position, "buffer": buffer,
                "tokens_out": self._packer.tokens_out, "tokens_cropped": self._packer.tokens_cropped}

    def set_state(self, state: dict) -> None:
        self.close()
        self._next_unit = state["epoch"] * self._source.share_len + state["position"]
        self._packer = BestFitPacker()
        for rg, docs in state["buffer"]:
            self._buffer(rg, docs, *self._source.tokenize(self._source.read(rg, docs), threads=0))
        self._packer.tokens_out, self._packer.tokens_cropped = state["tokens_out"], state["tokens_cropped"]

    def stats(self) -> dict:
        """Tokens written to rows and tokens dropped by crops, since the start of the run."""
        out, cropped = self._packer.tokens_out, self._packer.tokens_cropped
        return {"tokens_out": out, "tokens_cropped": cropped,
                "crop_fraction": cropped / (out + cropped) if out + cropped else 0.0}


def pretrain_loader(cfg, tokenizer: Tokenizer, split: str, rows: int, **kwargs) -> PretrainLoader:
    """A config's loader for this process: train loops over shuffled epochs, val is one in-order
    pass (the same rows every time). `kwargs` override PretrainLoader's arguments."""
    train = split == "train"
    options = {"process_index": jax.process_index(), "process_count": jax.process_count(), "seed": cfg.seed,
               "loop": train, "shuffle": train} | kwargs
    if "num_workers" not in options:
        options["num_workers"] = cfg.data.num_workers
    return PretrainLoader(shards_for_split(cfg.data, split), tokenizer, cfg.model.sequence_len, rows, **options)
