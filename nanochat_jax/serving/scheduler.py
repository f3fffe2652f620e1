"""The scheduler thread: it alone touches the device, admitting queued requests into free slots
between ticks and advancing every busy slot by one token per tick.

Request threads `submit` a `Request` and read its events; the scheduler puts `(request, token)`
for each generated token and `(request, None)` once it is finished (`finish_reason` set first). A
full waiting queue refuses the request at once (`QueueFull`), so a caller can answer 429 instead
of holding a connection open. `cancel()` (a client that went away) frees the slot at the next tick.
The calculator tool runs per slot through the engine's row state machine.
"""
import collections
import dataclasses
import logging
import queue
import threading
import time

import numpy as np

from nanochat_jax.engine import RowState
from nanochat_jax.serving.slots import Sampling, SlotPool

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """Every slot is busy and the waiting queue is at its bound."""


@dataclasses.dataclass(eq=False)
class Request:
    """One generation: `max_tokens` counts every generated token (forced tool output and the
    final stop token included), as the engine does."""
    prompt: list[int]
    max_tokens: int
    sampling: Sampling = Sampling()
    events: queue.Queue = dataclasses.field(default_factory=queue.Queue)
    finish_reason: str | None = None   # "stop" (a stop token), "length", "cancelled" or "error"
    num_generated: int = 0
    submitted_at: float = dataclasses.field(default_factory=time.monotonic)
    first_token_at: float | None = None
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()

    def tokens(self, timeout: float | None = None):
        """This request's tokens as they come (when it has its own `events` queue); raises
        queue.Empty if none arrives within `timeout` seconds."""
        while True:
            _, token = self.events.get(timeout=timeout)
            if token is None:
                return
            yield token


@dataclasses.dataclass(eq=False)
class _Active:
    request: Request
    row: RowState
    position: int   # where `token` goes in the slot's cache
    token: int      # the last emitted token, decoded at the next tick


class Scheduler:
    """Owns a SlotPool in a daemon thread; `max_waiting` bounds the requests waiting for a slot."""

    def __init__(self, pool: SlotPool, max_waiting: int = 64):
        self.pool, self.engine = pool, pool.engine
        self.waiting: queue.Queue = queue.Queue(maxsize=max_waiting)
        self.active: dict[int, _Active] = {}
        self.tokens_generated = 0
        self.recent = collections.deque(maxlen=4096)  # (time, tokens_generated) per tick, for tokens/s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nanochat-scheduler", daemon=True)

    # ---- request threads ----------------------------------------------------------------------
    def start(self) -> "Scheduler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def submit(self, request: Request) -> Request:
        """Queue `request` for a slot; QueueFull if the queue is at its bound or the scheduler stopped."""
        context = self.pool.context
        if not request.prompt or len(request.prompt) + request.max_tokens > context:
            raise ValueError(f"prompt of {len(request.prompt)} tokens + max_tokens {request.max_tokens} must fit "
                             f"the model's context of {context}")
        if self._stop.is_set():
            raise QueueFull("the scheduler is stopped")
        try:
            self.waiting.put_nowait(request)
        except queue.Full:
            raise QueueFull(f"all {self.pool.slots} slots are busy and {self.waiting.maxsize} requests are "
                            "waiting") from None
        return request

    def tokens_per_second(self, window: float = 10.0) -> float:
        """Generated tokens per second over about the last `window` seconds."""
        now, recent = time.monotonic(), list(self.recent)
        past = [(t, n) for t, n in recent if now - t <= window]
        if len(past) < 2:
            return 0.0
        (t0, n0), (t1, n1) = past[0], past[-1]
        return (n1 - n0) / max(now - t0, t1 - t0, 1e-9)

    # ---- the scheduler thread -----------------------------------------------------------------
    def _run(self):
        while not self._stop.is_set():
            self._drop_cancelled()
            self._admit(block=not self.active)
            if self.active:
                self._tick()
        for slot in list(self.active):
            self._finish(slot, "cancelled")
        while not self.waiting.empty():
            self._close(self.waiting.get_nowait(), "cancelled")

    def _admit(self, block: bool):
        """Prefill waiting requests into free slots (waiting briefly for one when idle)."""
        free = [s for s in range(self.pool.slots) if s not in self.active]
        while free:
            try:
                request = self.waiting.get(timeout=0.05) if block else self.waiting.get_nowait()
            except queue.Empty:
                return
            block = False
            if request.cancelled.is_set():
                self._close(request, "cancelled")
                continue
            slot = free.pop(0)
            try:
                first = self.pool.admit(slot, request.prompt, request.sampling)
            except Exception as err:  # a failed prefill fails its request, never the scheduler
                log.exception("prefill failed: %s", err)
                self._close(request, "error")
                continue
            self.active[slot] = _Active(request, RowState(), len(request.prompt), first)
            request.first_token_at = time.monotonic()
            self._emit(slot, first)

    def _tick(self):
        tokens, positions, steps = (np.zeros(self.pool.slots, np.int32) for _ in range(3))
        for slot, act in self.active.items():
            tokens[slot], positions[slot], steps[slot] = act.token, act.position, act.request.num_generated
        try:
            sampled = self.pool.step(tokens, positions, steps)
        except Exception as err:
            log.exception("decode step failed: %s", err)
            for slot in list(self.active):
                self._finish(slot, "error")
            return
        for slot in list(self.active):
            self.active[slot].position += 1
            self._emit(slot, int(sampled[slot]))
        self.recent.append((time.monotonic(), self.tokens_generated))

    def _emit(self, slot: int, sampled: int):
        """Pass the slot's sampled token through its tool state machine and on to its request."""
        act = self.active[slot]
        token, _ = self.engine.advance(act.row, sampled)
        act.request.num_generated += 1
        self.tokens_generated += 1
        if act.row.completed:
            return self._finish(slot, "stop")
        act.token = token
        act.request.events.put((act.request, token))
        if act.request.num_generated >= act.request.max_tokens:
            self._finish(slot, "length")

    def _drop_cancelled(self):
        for slot in [s for s, act in self.active.items() if act.request.cancelled.is_set()]:
            self._finish(slot, "cancelled")

    def _finish(self, slot: int, reason: str):
        self._close(self.active.pop(slot).request, reason)

    @staticmethod
    def _close(request: Request, reason: str):
        request.finish_reason = reason
        request.events.put((request, None))
