"""What the processes of a multi-host evaluation settle before they enter a collective.

A jitted step over a global batch is a collective: when one process calls it and another does not
(its rows ran out, or it lacks a task the others hold), the caller waits forever. These helpers
settle such questions with a small allgather that every process reaches at the same point; with a
single process they return at once.
"""
import json

import jax
import numpy as np
from jax.experimental import multihost_utils


def every_process(flag: bool) -> bool:
    """True when `flag` is true on every process."""
    if jax.process_count() == 1:
        return flag
    return bool(np.min(multihost_utils.process_allgather(np.int32(flag))))


def gather_json(value) -> list:
    """A JSON-serialisable `value` from every process, in process order."""
    if jax.process_count() == 1:
        return [value]
    data = np.frombuffer(json.dumps(value, sort_keys=True).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.int32(data.size))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    rows = multihost_utils.process_allgather(padded)
    return [json.loads(row[:size].tobytes()) for row, size in zip(rows, sizes)]
