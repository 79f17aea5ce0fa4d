"""Dynamic batching per model, by token budget.

Requests from many callers are tokenized on worker threads and their sequences land here. A
batching thread waits at most `max_delay` after the oldest pending sequence, then builds a batch
around it from the pending sequences of the most similar length, while the padded batch stays
within `max_tokens` (rows x longest row) and `max_size` rows, so little compute goes to padding.
A request that finds the model idle (nothing queued, nothing running) and could not gain from
waiting (it fills a batch by itself, as every request to a one-text-per-call model does, no delay
is allowed, or no other request is in progress on the model, so no company can come) runs at once
on its caller's thread, skipping two thread hand-offs and the delay: a lone caller measured 3.4 ms
a request through tritonclient on a tiny model with the 2 ms delay, 1.1 ms without it.
Expired and cancelled work is dropped, never run. Sessions run on these threads (onnxruntime
releases the GIL), never on the event loop.

A short request is also tokenized on a batching thread (`Batcher.call`): its job runs before the
next batch is formed and queues the request's sequences itself, so the event loop only hands the
request over and takes its answer back. Tokenizing there took a quarter of the loop's time per request
at 64 callers on a tiny model (bench/README.md), and the loop is what limits a server's requests/s.

With several instances, each batch is told whether it runs alone (no other batch running and
nothing else waiting): the model can then give it every core, and otherwise one core per instance
(see kiln.runtime.serve.models).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from kiln.runtime.errors import Cancelled, DeadlineExceeded, Draining, KilnError

log = logging.getLogger("kiln.serve")


# On CPU one text of ~60 tokens already keeps the GEMMs busy, and a batch of thousands of padded
# tokens only adds memory traffic: MiniLM int8 served to 64 clients ran 0.44x the raw session one at
# a time with batches of up to 8192 tokens and 0.99x with 512 (`kiln bench serve`, 2 cores).
CPU_BATCH_TOKENS = 512
GPU_BATCH_TOKENS = 8192


@dataclass
class BatchOptions:
    max_tokens: int = 8192  # padded tokens per batch (a served model resolves 0: CPU_BATCH_TOKENS on CPU)
    max_size: int = 64  # rows per batch
    max_delay: float = 0.002  # seconds the oldest sequence may wait for company
    max_queue: int = 1024  # items a model holds before new requests are refused (counted.Counted.admit)
    max_generating: int = 32  # generators: sequences decoded side by side (continuous batching)
    max_cache_tokens: int = 65536  # generators: KV cache tokens reserved by admitted sequences
    instances: int = 0  # batches run at once, like Triton's instance count (0: one per core on CPU, 1 on GPU)
    lone_cores: str = "auto"  # CPU, several instances: a batch alone runs on all | one | auto (timed at load)


@dataclass
class RequestState:
    """What the batcher needs to know about the call a sequence belongs to."""

    deadline: float | None = None  # time.monotonic() value
    cancelled: bool = False
    # seconds spent per stage (compute_input, queue, compute_infer, compute_output): Triton's
    # statistics count each request once per stage, whatever number of batches its rows ran in
    stages: dict[str, float] = field(default_factory=dict)
    spans: list[tuple[str, float, float]] | None = None  # (stage, start, end), kept only when traced
    lock: threading.Lock = field(default_factory=threading.Lock)  # rows may run on several instances

    def add_stage(self, stage: str, start: float, end: float) -> None:
        """A stage this request went through, from start to end (time.monotonic() seconds)."""
        with self.lock:
            self.stages[stage] = self.stages.get(stage, 0.0) + end - start
            if self.spans is not None:
                self.spans.append((stage, start, end))

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def why_not_run(self, now: float) -> KilnError | None:
        """The error its work ends with instead of running, if it must not run any more."""
        if self.cancelled:
            return Cancelled("request was cancelled")
        if self.expired(now):
            return DeadlineExceeded("deadline passed before the request ran; not run")
        return None


@dataclass
class _Item:
    sequence: Any  # has .ids and .type_ids
    request: RequestState
    future: Future
    enqueued: float
    waits: bool = True  # may wait up to max_delay for company (False: nothing can join it, run it now)
    # read once: a tokenizers Encoding builds a new list for every `.ids`, and batching reads the
    # length many times (12% of the batching thread's interpreter time under load when it did not)
    length: int = field(init=False)

    def __post_init__(self) -> None:
        self.length = len(self.sequence.ids)


@dataclass
class BatchRecord:
    """One executed batch, for metrics and statistics."""

    size: int
    padded_tokens: int
    real_tokens: int
    queue_seconds: list[float]
    infer_seconds: float
    alone: bool


class Batcher:
    def __init__(
        self,
        name: str,
        run_batch: Callable[[list[Any], bool], dict[str, np.ndarray]],
        split: Callable[[dict[str, np.ndarray], int, int], dict[str, np.ndarray]],
        options: BatchOptions,
        on_batch: Callable[[BatchRecord], None] = lambda record: None,
    ):
        self.name = name
        self._run_batch = run_batch
        self._split = split
        self.options = options
        self._on_batch = on_batch
        self._pending: list[_Item] = []
        self._jobs: list[Callable[[], None]] = []  # run on a batching thread before the next batch (`call`)
        self._cond = threading.Condition()
        self._stopping = False
        self._running = 0  # batches being executed now, by instances or inline
        self._instances = max(1, options.instances)
        self._threads = [
            threading.Thread(target=self._loop, name=f"batcher-{name}-{i}", daemon=True) for i in range(self._instances)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, sequences: list[Any], request: RequestState, company: bool = True) -> list[Future]:
        """Queue a request's sequences. How many may be held is admission control's to say, once, before
        a request reaches here (`Counted.admit`, --max-queue). Without `company` (no other request in
        progress) they do not wait for more."""
        now = time.monotonic()
        with self._cond:
            if self._stopping:
                raise Draining("server is shutting down")
            items = [_Item(seq, request, Future(), now, company) for seq in sequences]
            self._pending.extend(items)
            self._cond.notify_all()
        return [item.future for item in items]

    def call(self, job: Callable[[], None]) -> None:
        """Run `job()` on a batching thread before it forms its next batch: a request's
        preparation, which then `submit`s its sequences from there. A job must not raise (it answers
        its own caller). One queued before the batcher stops still runs (and its `submit` is refused);
        once it stops, no more are taken."""
        with self._cond:
            if self._stopping:
                raise Draining("server is shutting down")
            self._jobs.append(job)
            self._cond.notify()

    def run_if_idle(
        self, sequences: list[Any], request: RequestState, company: bool = True
    ) -> list[dict[str, np.ndarray]] | None:
        """Per-sequence outputs, in order, run at once on the calling (worker) thread when the model
        is idle and the request cannot gain from waiting (`company`: other requests are in progress,
        so some may join it); None when it should be queued instead."""
        inline = self._claim_idle(sequences, request, company)
        if inline is None:
            return None
        try:
            self._execute(inline, alone=True)
        finally:
            self._release()
        return [item.future.result() for item in inline]

    def _claim_idle(self, sequences: list[Any], request: RequestState, company: bool) -> list[_Item] | None:
        """The request's items, if it may run at once (see the module docstring); else None."""
        longest = max((len(seq.ids) for seq in sequences), default=0)
        fits = 0 < len(sequences) <= self.options.max_size and len(sequences) * longest <= self.options.max_tokens
        waiting_helps = company and len(sequences) < self.options.max_size and self.options.max_delay > 0
        now = time.monotonic()
        with self._cond:
            if not fits or waiting_helps or self._stopping or self._pending or self._running:
                return None
            dead = request.why_not_run(now)
            if dead is not None:
                raise dead
            self._running += 1
        return [_Item(seq, request, Future(), now) for seq in sequences]

    def _release(self) -> None:
        with self._cond:
            self._running -= 1
            self._cond.notify_all()

    def stop(self) -> None:
        """Finish what is queued, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._jobs and (not self._pending or self._running >= self._instances):
                    self._cond.wait()
                jobs, self._jobs = self._jobs, []
                if not jobs:
                    if not self._pending and self._stopping:
                        return
                    if not self._waited_for_company():
                        continue  # a job came in meanwhile: its rows may join this batch
                    batch = self._take_batch()
                    alone = self._running == 0 and not self._pending
                    self._running += 1
            if jobs:
                self._run_jobs(jobs)
                continue
            try:
                if batch:
                    self._execute(batch, alone)
            finally:
                self._release()

    def _run_jobs(self, jobs: list[Callable[[], None]]) -> None:
        for job in jobs:
            try:
                job()
            except Exception:  # a job answers its own caller; one that raises must not stop the thread
                log.exception("model %s: preparing a request failed", self.name)

    def _waited_for_company(self) -> bool:
        """Hold the oldest sequence up to max_delay, unless a full batch is already there; False if
        a job arrived meanwhile (it is run first, then the wait goes on from the same oldest)."""
        oldest = min(item.enqueued for item in self._pending)
        if not all(item.waits for item in self._pending):
            return True
        while self._pending and not self._stopping:
            if self._jobs:
                return False
            remaining = oldest + self.options.max_delay - time.monotonic()
            pending_tokens = sum(item.length for item in self._pending)
            if (
                remaining <= 0
                or pending_tokens >= self.options.max_tokens
                or len(self._pending) >= self.options.max_size
            ):
                return True
            self._cond.wait(remaining)
        return True

    def _take_batch(self) -> list[_Item]:
        """Drop dead items; then the oldest item and its closest neighbours in length."""
        now = time.monotonic()
        live = []
        for item in self._pending:
            dead = Cancelled("request was cancelled") if item.future.cancelled() else item.request.why_not_run(now)
            if dead is not None:
                _settle(item.future, error=dead)
            else:
                live.append(item)
        self._pending = live
        if not live:
            return []
        anchor = min(live, key=lambda item: item.enqueued)
        by_closeness = sorted(live, key=lambda item: (abs(item.length - anchor.length), item.enqueued))
        batch: list[_Item] = []
        longest = 0
        for item in by_closeness:
            longest_if_added = max(longest, item.length)
            rows = len(batch) + 1
            if batch and (rows > self.options.max_size or rows * longest_if_added > self.options.max_tokens):
                break
            batch.append(item)
            longest = longest_if_added
        chosen = {id(item) for item in batch}
        self._pending = [item for item in live if id(item) not in chosen]
        return batch

    def _execute(self, batch: list[_Item], alone: bool) -> None:
        start = time.monotonic()
        try:
            outputs = self._run_batch([item.sequence for item in batch], alone)
        except Exception as exc:  # one failing batch must not kill the thread or the server
            if len(batch) > 1:  # find the row at fault: its batch-mates must not fail with it
                log.warning(
                    "model %s: a batch of %d failed (%s); running its rows one by one", self.name, len(batch), exc
                )
                for item in batch:
                    self._execute([item], alone)
                return
            log.exception("model %s: a request's row failed", self.name)
            _settle(batch[0].future, error=exc)
            return
        infer = time.monotonic() - start
        longest = max(item.length for item in batch)
        record = BatchRecord(
            size=len(batch),
            padded_tokens=longest * len(batch),
            real_tokens=sum(item.length for item in batch),
            queue_seconds=[start - item.enqueued for item in batch],
            infer_seconds=infer,
            alone=alone,
        )
        try:  # recorded before any answer leaves: a caller that has its answer finds its batch counted
            self._on_batch(record)
        except Exception:  # metrics must never stop a batcher thread
            log.exception("model %s: recording a batch failed", self.name)
        for request, enqueued in _first_enqueued(batch).values():  # a request's rows in one batch: once
            request.add_stage("queue", enqueued, start)
            request.add_stage("compute_infer", start, start + infer)
        for row, item in enumerate(batch):
            try:
                _settle(item.future, result=self._split(outputs, row, item.length))
            except Exception as exc:  # one row's outputs that cannot be taken apart fail that row alone
                log.exception("model %s: a request's outputs could not be split", self.name)
                _settle(item.future, error=exc)


def _first_enqueued(batch: list[_Item]) -> dict[int, tuple[RequestState, float]]:
    """Each request with rows in the batch, and when its first of them was queued."""
    first: dict[int, tuple[RequestState, float]] = {}
    for item in batch:
        known = first.get(id(item.request))
        if known is None or item.enqueued < known[1]:
            first[id(item.request)] = (item.request, item.enqueued)
    return first


def _settle(future: Future, result: Any = None, error: BaseException | None = None) -> None:
    """Resolve a sequence's future, unless its caller already gave up on it (a cancelled call
    cancels the future it awaits): that must never stop a batcher thread."""
    if future.cancelled():
        return
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:  # cancelled between the check and the call
        pass


def when_all(futures: list[Future], then: Callable[[], None]) -> None:
    """Call `then()` once every one of a request's row futures has settled, on whichever thread
    settles the last (its rows may run on several batcher threads at once)."""
    remaining = [len(futures)]
    lock = threading.Lock()

    def settled(_: Future) -> None:
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if last:
            then()

    for future in futures:
        future.add_done_callback(settled)


def row_error(futures: list[Future]) -> BaseException | None:
    """What a request whose rows have all settled fails with, if anything: the first row's error,
    else Cancelled where a row was cancelled (its caller gave up)."""
    error = next((f.exception() for f in futures if not f.cancelled() and f.exception()), None)
    if error is None and any(f.cancelled() for f in futures):
        return Cancelled("request was cancelled")
    return error
