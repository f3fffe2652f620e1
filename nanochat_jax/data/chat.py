"""Chat batches for midtraining and SFT: a task's conversations, rendered, with an exact checkpoint.

Both loaders walk a task (usually a `TaskMixture`, already shuffled with nanochat's Random(42))
in order, process p of P taking conversations p, p+P, p+2P, ... (nanochat's cursor stride),
pass after pass. Rendering runs in a Grain pipeline over stream positions, a pure function of
the position, so batches depend only on the task, tokenizer, process index and count and the
loader's shape arguments. Conversations longer than the context are cropped, as nanochat's
`render_conversation(max_tokens)` does.

- Midtraining (`MidtrainLoader`): rendered conversations are packed best-fit into BOS-aligned
  rows of seq_len + 1 tokens, like pretraining's rows, and every token is trained on: the mask
  is dropped, as in nanochat's mid_train, which makes midtraining pretraining on chat text.
- SFT (`SFTLoader`): one conversation per row; targets are ids[1:] with -1 wherever mask[1:]
  is 0, so only what the assistant writes is trained on (nanochat's chat_sft); inputs are padded
  with `<|assistant_end|>` and targets with -1 to the next multiple of `bucket` (capped at
  seq_len), so a handful of widths, not every length, get compiled.

`progress` counts passes over this process's conversations (1.0: one pass taken), which is how
a stage stops after one epoch (nanochat's `last_step`; processes may differ by one conversation,
so a multi-process stage takes the max). `get_state()` is JSON-serialisable; after
`set_state()` of it the same batches follow.
"""
import sys

import grain
import jax
import numpy as np

from nanochat_jax.conversation import render_conversation
from nanochat_jax.data.packing import BestFitPacker

PREFETCH = 64  # conversations rendered ahead in a background thread


class ConversationStream:
    """This process's conversations in stream order; calling it with a position renders one."""

    def __init__(self, task, tokenizer, max_tokens: int, *, process_index: int, process_count: int):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
        self.share_len = len(range(process_index, len(task), process_count))
        if not self.share_len:
            raise ValueError(f"process {process_index} of {process_count} gets no conversations "
                             f"from a task of {len(task)}")
        self.task, self.tokenizer, self.max_tokens = task, tokenizer, max_tokens
        self.process_index, self.process_count = process_index, process_count

    def index_at(self, position: int) -> int:
        return self.process_index + (position % self.share_len) * self.process_count

    def render(self, index: int) -> dict:
        """ids and mask (int32) cut to max_tokens, and the untruncated length (for crop counts)."""
        ids, mask = render_conversation(self.tokenizer, self.task[index], max_tokens=sys.maxsize)
        return {"index": index, "ids": np.asarray(ids[:self.max_tokens], np.int32),
                "mask": np.asarray(mask[:self.max_tokens], np.int32), "length": len(ids)}

    def __call__(self, position: int) -> dict:
        return self.render(self.index_at(position))

    def open(self, start: int, stop: int):
        ds = grain.MapDataset.range(start, stop).map(self)
        return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=PREFETCH)))


class _ChatLoader:
    """The stream position, the Grain iterator from it, one pass or many, and the state protocol."""

    def __init__(self, stream: ConversationStream, rows: int, loop: bool):
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        self._stream, self.rows, self.loop = stream, rows, loop
        self._next = 0  # stream position of the next conversation to take
        self._iterator = None

    def __iter__(self):
        return self

    @property
    def progress(self) -> float:
        """Passes over this process's conversations taken so far (1.0 = one epoch)."""
        return self._next / self._stream.share_len

    def _take(self) -> dict | None:
        """The next rendered conversation, or None once a one-pass loader is done."""
        if not self.loop and self._next >= self._stream.share_len:
            self.close()
            return None
        if self._iterator is None:
            self._iterator = self._stream.open(self._next, 2 ** 62 if self.loop else self._stream.share_len)
        self._next += 1
        return next(self._iterator)

    def close(self) -> None:
        if self._iterator is not None:
            self._iterator.close()
            self._iterator = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _position_state(self) -> dict:
        epoch, position = divmod(self._next, self._stream.share_len)
        return {"epoch": epoch, "position": position}

    def _set_position(self, state: dict) -> None:
        self.close()
        self._next = state["epoch"] * self._stream.share_len + state["position"]


class MidtrainLoader(_ChatLoader):
    """An iterator of int32 (rows, seq_len + 1) batches of packed conversations, every row full
    and starting with BOS; callers take inputs = batch[:, :-1], targets = batch[:, 1:].

    The packing buffer is topped up to `buffer_docs` conversations before each placement (at most
    one pass of this process's conversations, so a small task is not buffered several times). A
    one-pass loader (`loop=False`, for val) raises StopIteration when the conversations run out
    (a partly filled last batch is dropped).
    """

    def __init__(self, task, tokenizer, seq_len: int, rows: int, *, process_index: int = 0,
                 process_count: int = 1, buffer_docs: int = 1000, loop: bool = True):
        if min(seq_len, buffer_docs) < 1:
            raise ValueError("seq_len and buffer_docs must be >= 1")
        stream = ConversationStream(task, tokenizer, seq_len + 1, process_index=process_index,
                                    process_count=process_count)
        super().__init__(stream, rows, loop)
        self.row_len, self.buffer_docs = seq_len + 1, min(buffer_docs, stream.share_len)
        self._packer = BestFitPacker()

    def __next__(self) -> np.ndarray:
        batch = np.empty((self.rows, self.row_len), dtype=np.int32)
        for row in batch:
            filled = 0
            while filled < self.row_len:
                while len(self._packer) < self.buffer_docs and self._buffer(self._take()):
                    pass
                if not len(self._packer):
                    raise StopIteration
                filled = self._packer.place(row, filled)
        return batch

    def _buffer(self, conversation: dict | None) -> bool:
        if conversation is None:
            return False
        self._packer.add(conversation["ids"], conversation["index"])
        self._packer.tokens_cropped += conversation["length"] - len(conversation["ids"])
        return True

    def get_state(self) -> dict:
        return {**self._position_state(), "buffer": [int(i) for i in self._packer.refs()],
                "tokens_out": self._packer.tokens_out, "tokens_cropped": self._packer.tokens_cropped}

    def set_state(self, state: dict) -> None:
        self._set_position(state)
        self._packer = BestFitPacker()
        for index in state["buffer"]:
            self._buffer(self._stream.render(index))
        self._packer.tokens_out, self._packer.tokens_cropped = state["tokens_out"], state["tokens_cropped"]

    def stats(self) -> dict:
        """Tokens written to rows and tokens dropped (cropped to the row or by packing), so far."""
        out, cropped = self._packer.tokens_out, self._packer.tokens_cropped
        return {"tokens_out": out, "tokens_cropped": cropped,
                "crop_fraction": cropped / (out + cropped) if out + cropped else 0.0}


def bucket_width(longest: int, seq_len: int, bucket: int) -> int:
    """The padded width of a batch whose longest row has `longest` positions."""
    return min(-(-longest // bucket) * bucket, seq_len)


class SFTLoader(_ChatLoader):
    """An iterator of (inputs, targets) int32 (rows, width) batches, one conversation per row.

    width is `bucket_width` of the longest row. A one-pass loader's last batch is filled up with
    rows that have no targets, so no conversation is dropped and the shape stays (rows, width).
    """

    def __init__(self, task, tokenizer, seq_len: int, rows: int, *, process_index: int = 0,
                 process_count: int = 1, bucket: int = 64, loop: bool = True):
        if min(seq_len, bucket) < 1:
            raise ValueError("seq_len and bucket must be >= 1")
        stream = ConversationStream(task, tokenizer, seq_len + 1, process_index=process_index,
                                    process_count=process_count)
        super().__init__(stream, rows, loop)
        self.seq_len, self.bucket = seq_len, bucket
        self.pad_id = tokenizer.encode_special("<|assistant_end|>")

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        taken = [c for c in (self._take() for _ in range(self.rows)) if c is not None]
        if not taken:
            raise StopIteration
        width = bucket_width(max(len(c["ids"]) for c in taken) - 1, self.seq_len, self.bucket)
        inputs = np.full((self.rows, width), self.pad_id, dtype=np.int32)
        targets = np.full((self.rows, width), -1, dtype=np.int32)
        for row, c in enumerate(taken):
            n = len(c["ids"]) - 1
            inputs[row, :n] = c["ids"][:-1]
            targets[row, :n] = np.where(c["mask"][1:] == 1, c["ids"][1:], -1)
        return inputs, targets

    def get_state(self) -> dict:
        return self._position_state()

    def set_state(self, state: dict) -> None:
        self._set_position(state)


def _process_options(kwargs) -> dict:
    return {"process_index": jax.process_index(), "process_count": jax.process_count()} | kwargs


def midtrain_loader(cfg, task, tokenizer, rows: int, **kwargs) -> MidtrainLoader:
    """This process's midtraining loader at the config's sequence length; `kwargs` override."""
    return MidtrainLoader(task, tokenizer, cfg.model.sequence_len, rows, **_process_options(kwargs))


def sft_loader(cfg, task, tokenizer, rows: int, **kwargs) -> SFTLoader:
    """This process's SFT loader at the config's sequence length; `kwargs` override."""
    return SFTLoader(task, tokenizer, cfg.model.sequence_len, rows, **_process_options(kwargs))
