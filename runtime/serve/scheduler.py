"""Continuous (iteration-level) batching for a generator.

One thread owns the model's `Decoding`: between two decoding steps it takes the sequences that
arrived (prefilled together, they join the running batch at the next step), and after each step a
sequence that finished, was cancelled or ran out of time has already left. Pieces of text go back
to each caller's event loop as they are produced. So a short answer never waits for a long one,
and a new request starts within one step, not after the batch drains.

Backpressure is by KV cache: every admitted sequence (and every beam search, `reserve`) reserves
its prompt and the most tokens it may generate, and a request that would take the reservations past
`max_cache_tokens` is refused at once (RESOURCE_EXHAUSTED) rather than accepted and starved. Rows
beyond `max_rows` wait for a free row; a waiting sequence whose caller left gives its share back at
the next iteration, free row or not.

No request can stop the thread: `Decoding` ends only the sequences a failure touched, an iteration
that raises anyway ends the sequences it held, and a thread that dies anyway (a bug) fails every
sequence it held or queued at once, reports itself not alive (readiness NOT_SERVING, new work
UNAVAILABLE) and is started again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from kiln.runtime.errors import ModelUnavailable, QueueFull
from kiln.runtime.generation.decoding import FINISH_CANCELLED, Decoding, Sequence, fail

log = logging.getLogger("kiln.serve")
MAX_RESTART_DELAY = 5.0  # seconds; a loop that keeps dying is started again at most this often


@dataclass
class StepRecord:
    """One decoding iteration, for metrics: rows stepped, seconds, cache held."""

    rows: int
    seconds: float
    cache_tokens: int


class Scheduler:
    def __init__(
        self,
        decoding: Decoding,
        max_rows: int,
        max_cache_tokens: int,
        record: Callable[[StepRecord], None] = lambda record: None,
        name: str = "",
    ):
        self.decoding = decoding
        self.max_rows = max_rows
        self.max_cache_tokens = max_cache_tokens
        self.record = record
        self.name = name
        self.reserved = 0  # KV cache tokens promised to admitted, unfinished sequences and beam searches
        self.restarts = 0  # times the thread died and was started again
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []  # taken off the queue: being prefilled or decoding
        self._wake = threading.Condition()
        self._stopped = False
        self._alive = False
        self._failures_in_a_row = 0
        self._thread: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        """False from the moment the thread died until it runs again."""
        return self._alive

    def start(self) -> None:
        self._alive = True
        self._thread = threading.Thread(target=self._run, name=f"kiln-decoding-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @staticmethod
    def cost(sequence: Sequence) -> int:
        return len(sequence.prompt) + sequence.allowed

    def submit(self, sequences: list[Sequence]) -> None:
        """Admit sequences, or refuse them all if their cache reservation does not fit."""
        with self._wake:
            self._reserve(sum(self.cost(s) for s in sequences))
            self._waiting.extend(sequences)
            self._wake.notify()

    def reserve(self, tokens: int) -> None:
        """Hold KV cache tokens for work outside the running batch (a beam search); `release` them."""
        with self._wake:
            self._reserve(tokens)

    def release(self, tokens: int) -> None:
        with self._wake:
            self.reserved -= tokens

    def _reserve(self, needed: int) -> None:
        if not self._alive:
            raise ModelUnavailable(f"model {self.name}: generation is restarting after a failure; retry shortly")
        if needed > self.max_cache_tokens:
            raise QueueFull(
                f"request needs {needed} KV cache tokens (prompts + max_new_tokens, times beams); the model holds "
                f"at most {self.max_cache_tokens} (--max-cache-tokens): ask for fewer tokens"
            )
        if self.reserved + needed > self.max_cache_tokens:
            raise QueueFull(
                f"KV cache budget full ({self.reserved} of {self.max_cache_tokens} tokens reserved); retry later"
            )
        self.reserved += needed

    # ---- the decoding thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # a bug in the loop itself: nothing may wait on a dead thread
            log.critical("model %s: the decoding thread died; failing what it held, then restarting", self.name,
                         exc_info=exc)  # fmt: skip
            self._restart(exc)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopped and not self._waiting and not self.decoding.active:
                    self._wake.wait()
                if self._stopped:
                    return
                joining = self._take()
                self._running += joining
            started = time.monotonic()
            try:
                if self.decoding.active:
                    self.decoding.step()
                if joining:
                    self.decoding.add(joining)
                self._failures_in_a_row = 0
            except Exception as exc:  # Decoding keeps failures to the rows they touch; this is the last guard
                log.exception("model %s: a decoding iteration failed; ending the sequences it held", self.name)
                self.decoding.groups.clear()
                for sequence in self._running:
                    fail(sequence, exc)
            self._release_finished()
            self._record(StepRecord(self.decoding.active, time.monotonic() - started, self.decoding.cache_tokens()))

    def _take(self) -> list[Sequence]:
        """Waiting sequences that fit in the free rows; every one cancelled while it waited leaves."""
        for sequence in [s for s in self._waiting if s.cancelled]:
            self._waiting.remove(sequence)
            self.reserved -= self.cost(sequence)
            sequence.finish_reason = FINISH_CANCELLED
        joining: list[Sequence] = []
        free = self.max_rows - self.decoding.active
        while self._waiting and len(joining) < free:
            joining.append(self._waiting.popleft())
        return joining

    def _release_finished(self) -> None:
        done = [s for s in self._running if s.finish_reason is not None]
        if not done:
            return
        for sequence in done:
            if sequence.error is not None:
                log.error("model %s: request %s failed in a decoding step", self.name, sequence.request_id or "-",
                          exc_info=sequence.error)  # fmt: skip
        self._running = [s for s in self._running if s.finish_reason is None]
        with self._wake:
            self.reserved -= sum(self.cost(s) for s in done)

    def _record(self, record: StepRecord) -> None:
        try:
            self.record(record)
        except Exception:  # metrics must never end a sequence
            log.exception("model %s: recording a decoding step failed", self.name)

    def _restart(self, error: BaseException) -> None:
        with self._wake:
            self._alive = False
            held = [*self._waiting, *self._running]
            self._waiting.clear()
            self._running = []
            self.decoding.groups.clear()
            self.reserved -= sum(self.cost(s) for s in held)
            stopped = self._stopped
        for sequence in held:
            fail(sequence, error)
        if stopped:
            return
        self.restarts += 1
        self._failures_in_a_row += 1
        time.sleep(min(0.05 * 2 ** (self._failures_in_a_row - 1), MAX_RESTART_DELAY))
        self.start()
