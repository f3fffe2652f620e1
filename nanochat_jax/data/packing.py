"""Best-fit packing of BOS-prefixed documents into fixed-length rows, as nanochat's BOS-aligned loader.

A row is filled by repeatedly taking the largest buffered document that fits in the space left;
when none fits, the shortest buffered document is cropped to fill the row exactly and the rest of
it is dropped. Rows are therefore always full (no padding) and always start at a document's BOS,
so no token attends across a document boundary it could not see at inference. Ties go to the
document that entered the buffer first, which makes packing a pure function of the buffer's order.
"""
import bisect
import math

import numpy as np


class BestFitPacker:
    """A buffer of tokenized documents, each with a caller-chosen reference, and the packing rule.

    Documents are kept sorted by (length, arrival) so each choice is a bisection, not a scan of
    the buffer. `tokens_out` counts tokens written to rows, `tokens_cropped` those dropped by crops.
    """

    def __init__(self):
        self._order: list[tuple[int, int]] = []  # (length, arrival), sorted
        self._docs: dict[int, tuple[np.ndarray, object]] = {}  # arrival -> (tokens, ref), in arrival order
        self._arrivals = 0
        self.tokens_out = 0
        self.tokens_cropped = 0

    def __len__(self) -> int:
        return len(self._docs)

    def add(self, tokens: np.ndarray, ref) -> None:
        if len(tokens) == 0:
            raise ValueError("empty document: every document must start with BOS")
        bisect.insort(self._order, (len(tokens), self._arrivals))
        self._docs[self._arrivals] = (tokens, ref)
        self._arrivals += 1

    def refs(self) -> list:
        """References of the buffered documents in arrival order: with them the buffer can be rebuilt."""
        return [ref for _, ref in self._docs.values()]

    def place(self, row: np.ndarray, filled: int) -> int:
        """Write one buffered document into `row[filled:]`; return the new fill level."""
        space = len(row) - filled
        i = bisect.bisect_right(self._order, (space, math.inf)) - 1
        if i >= 0:  # the largest that fits; the first arrival among equal lengths
            i = bisect.bisect_left(self._order, (self._order[i][0], -1))
        else:  # none fits: crop the shortest
            i = 0
        length, arrival = self._order.pop(i)
        tokens, _ = self._docs.pop(arrival)
        used = min(length, space)
        row[filled:filled + used] = tokens[:used]
        self.tokens_out += used
        self.tokens_cropped += length - used
        return filled + used
