"""Continuous (iteration-level) batching for a generator.

One thread owns the model's `Decoding`: between two decoding steps it takes the sequences that
arrived (prefilled together, they join the running batch at the next step), and after each step a
sequence that finished, was cancelled or ran out of time has already left. Pieces of text go back
to each caller's event loop as they are produced. So a short answer never waits for a long one,
and a new request starts within one step, not after the batch drains.

Backpressure is by KV cache: every admitted sequence reserves its prompt and the most tokens it may
generate, and a request that would take the reservations past `max_cache_tokens` is refused at once
(RESOURCE_EXHAUSTED) rather than accepted and starved. Rows beyond `max_rows` wait for a free row.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from kiln.runtime.errors import QueueFull
from kiln.runtime.generation.decoding import Decoding, Sequence

log = logging.getLogger("kiln.serve")


@dataclass
class StepRecord:
    """One decoding iteration, for metrics: rows stepped, rows that joined, seconds, cache held."""

    rows: int
    joined: int
    seconds: float
    cache_tokens: int


class Scheduler:
    def __init__(
        self,
        decoding: Decoding,
        max_rows: int,
        max_cache_tokens: int,
        record: Callable[[StepRecord], None] = lambda record: None,
    ):
        self.decoding = decoding
        self.max_rows = max_rows
        self.max_cache_tokens = max_cache_tokens
        self.record = record
        self.reserved = 0  # KV cache tokens promised to admitted, unfinished sequences
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._wake = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="kiln-decoding", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=5)

    @staticmethod
    def cost(sequence: Sequence) -> int:
        return len(sequence.prompt) + sequence.allowed

    def submit(self, sequences: list[Sequence]) -> None:
        """Admit sequences, or refuse them all if their cache reservation does not fit."""
        needed = sum(self.cost(s) for s in sequences)
        with self._wake:
            if needed > self.max_cache_tokens:
                raise QueueFull(
                    f"request needs {needed} KV cache tokens (prompts + max_new_tokens); the model holds at most "
                    f"{self.max_cache_tokens} (--max-cache-tokens): ask for fewer tokens"
                )
            if self.reserved + needed > self.max_cache_tokens:
                raise QueueFull(
                    f"KV cache budget full ({self.reserved} of {self.max_cache_tokens} tokens reserved); retry later"
                )
            self.reserved += needed
            self._waiting.extend(sequences)
            self._wake.notify()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopped and not self._waiting and not self.decoding.active:
                    self._wake.wait()
                if self._stopped:
                    return
                joining = self._take()
            started = time.monotonic()
            try:
                if self.decoding.active:
                    self.decoding.step()
                if joining:
                    self.decoding.add(joining)
            except Exception:  # a failing step ends the sequences in it, not the server
                log.exception("decoding step failed; ending the sequences it held")
                self._fail(self._running + joining)
            self._running += joining
            self._release_finished()
            self.record(
                StepRecord(self.decoding.active, len(joining), time.monotonic() - started, self.decoding.cache_tokens())
            )

    def _take(self) -> list[Sequence]:
        """Waiting sequences that fit in the free rows, dropping those cancelled while they waited."""
        joining: list[Sequence] = []
        free = self.max_rows - self.decoding.active
        while self._waiting and len(joining) < free:
            sequence = self._waiting.popleft()
            if sequence.cancelled:
                self.reserved -= self.cost(sequence)
                sequence.finish_reason = "cancelled"
                continue
            joining.append(sequence)
        return joining

    def _release_finished(self) -> None:
        done = [s for s in self._running if s.finish_reason is not None]
        if done:
            self._running = [s for s in self._running if s.finish_reason is None]
            with self._wake:
                self.reserved -= sum(self.cost(s) for s in done)

    def _fail(self, sequences: list[Sequence]) -> None:
        self.decoding.groups.clear()
        for sequence in sequences:
            if sequence.finish_reason is None:
                sequence.finish_reason = "error"
                sequence.on_piece_error()
