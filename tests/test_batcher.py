"""The batcher's scheduling, with a recording stand-in for the session: which thread runs a batch,
whether it is told it runs alone, how many batches run at once."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pytest
from kiln.runtime.errors import Draining
from kiln.runtime.serve.batcher import Batcher, BatchOptions, RequestState


@dataclass
class Sequence:
    ids: list[int]
    type_ids: list[int] = field(default_factory=list)


@dataclass
class Run:
    thread: str
    alone: bool
    size: int
    start: float
    end: float


class RecordingSession:
    """Stands in for a session: records each batch and takes `seconds` to run it."""

    def __init__(self, seconds: float = 0.0):
        self.seconds = seconds
        self.runs: list[Run] = []
        self._lock = threading.Lock()

    def __call__(self, sequences: list[Sequence], alone: bool) -> dict[str, np.ndarray]:
        start = time.monotonic()
        time.sleep(self.seconds)
        with self._lock:
            run = Run(threading.current_thread().name, alone, len(sequences), start, time.monotonic())
            self.runs.append(run)
        return {"length": np.array([[len(s.ids)] for s in sequences])}


def split(outputs: dict[str, np.ndarray], row: int, length: int) -> dict[str, np.ndarray]:
    return {name: value[row] for name, value in outputs.items()}


def run_request(batcher: Batcher, sequences: list, request: RequestState) -> list:
    """As the server's worker threads do: at once when the model is idle, else queued (and waited for)."""
    outputs = batcher.run_if_idle(sequences, request)
    if outputs is None:
        outputs = [future.result() for future in batcher.submit(sequences, request)]
    return outputs


def started(session: RecordingSession, options: BatchOptions) -> Batcher:
    batcher = Batcher("test", session, split, options)
    batcher.start()
    return batcher


def test_lone_request_to_an_idle_one_text_model_runs_at_once_on_the_callers_thread():
    session = RecordingSession()
    batcher = started(session, BatchOptions(max_size=1, instances=2))
    try:
        outputs = run_request(batcher, [Sequence([1, 2, 3])], RequestState())
    finally:
        batcher.stop()
    assert outputs[0]["length"].tolist() == [3]
    assert [(run.thread, run.alone) for run in session.runs] == [(threading.current_thread().name, True)]


def test_lone_request_to_a_batching_model_waits_for_company_on_a_batcher_thread():
    session = RecordingSession()
    batcher = started(session, BatchOptions(max_size=8, max_delay=0.01, instances=2))
    try:
        run_request(batcher, [Sequence([1, 2, 3])], RequestState())
    finally:
        batcher.stop()
    assert session.runs[0].thread.startswith("batcher-test-")


def test_under_load_instances_run_side_by_side_and_are_told_so():
    session = RecordingSession(seconds=0.02)
    batcher = started(session, BatchOptions(max_size=1, instances=2))
    try:
        with ThreadPoolExecutor(12) as callers:
            outputs = list(
                callers.map(lambda n: run_request(batcher, [Sequence([7] * n)], RequestState()), range(1, 13))
            )
    finally:
        batcher.stop()
    assert [o[0]["length"].tolist() for o in outputs] == [[n] for n in range(1, 13)]
    runs = session.runs
    assert len(runs) == 12
    most_at_once = max(sum(other.start <= run.start < other.end for other in runs) for run in runs)
    assert most_at_once == 2  # never more batches at once than instances
    assert any(run.alone for run in runs) and any(not run.alone for run in runs)
    jitter = 0.005  # between the batcher's decision and the stand-in's clock
    for run in runs:
        if run.alone:  # nothing else was running when it started
            assert not any(other.start < run.start - jitter < other.end for other in runs if other is not run)


def test_a_failing_row_fails_alone_and_its_batch_mates_are_answered():
    """A batch that fails is run again row by row: only the row at fault fails."""

    class PoisonSession(RecordingSession):
        def __init__(self) -> None:
            super().__init__()
            self.failed_sizes: list[int] = []

        def __call__(self, sequences, alone):
            if any(s.ids == [666] for s in sequences):
                self.failed_sizes.append(len(sequences))
                raise RuntimeError("index out of range")
            return super().__call__(sequences, alone)

    session = PoisonSession()
    batcher = started(session, BatchOptions(max_size=16, max_delay=0.05, instances=1))
    try:
        with ThreadPoolExecutor(13) as callers:
            rows = [[7] * n for n in range(1, 13)] + [[666]]
            futures = [callers.submit(run_request, batcher, [Sequence(r)], RequestState()) for r in rows]
            outcomes = []
            for future in futures:
                try:
                    outcomes.append(future.result()[0]["length"].tolist())
                except RuntimeError as exc:
                    outcomes.append(str(exc))
    finally:
        batcher.stop()
    assert outcomes == [[n] for n in range(1, 13)] + ["index out of range"]
    assert max(session.failed_sizes) > 1 and session.failed_sizes[-1] == 1  # batched, failed, then row by row


def test_a_row_that_cannot_be_split_fails_alone_and_broken_metrics_stop_nothing():
    """The batcher thread outlives a failing split (that row gets the error, its batch-mates their
    outputs) and a metrics callback that raises."""

    def picky_split(outputs, row, length):
        if length == 13:
            raise ValueError("injected: this row's outputs cannot be split")
        return split(outputs, row, length)

    def broken_metrics(record):
        raise RuntimeError("injected: the metrics registry is broken")

    options = BatchOptions(max_tokens=4096, max_size=8, max_delay=0.05, instances=1)
    batcher = Batcher("test", RecordingSession(), picky_split, options, broken_metrics)
    batcher.start()
    try:
        futures = batcher.submit([Sequence([1] * 5), Sequence([1] * 13), Sequence([1] * 7)], RequestState())
        assert futures[0].result(timeout=5)["length"].tolist() == [5]
        assert "injected" in str(futures[1].exception(timeout=5))
        assert futures[2].result(timeout=5)["length"].tolist() == [7]
        again = batcher.submit([Sequence([1] * 3)], RequestState())
        assert again[0].result(timeout=5)["length"].tolist() == [3]
    finally:
        batcher.stop()


def test_a_job_prepares_on_a_batcher_thread_and_its_rows_join_the_batch_being_gathered():
    """A short request's job runs on the batching thread (not its caller's) and its rows are queued
    from there; one that arrives while the oldest row waits for company runs first and joins it."""
    session = RecordingSession()
    batcher = started(session, BatchOptions(max_size=8, max_delay=0.2, instances=1))
    futures: list = []
    ran_on: list[str] = []

    def job(length: int) -> None:
        ran_on.append(threading.current_thread().name)
        futures.extend(batcher.submit([Sequence(list(range(length)))], RequestState()))

    try:
        batcher.call(lambda: job(3))
        time.sleep(0.05)  # the first row now waits for company (up to 0.2 s)
        batcher.call(lambda: job(4))
        deadline = time.monotonic() + 5
        while len(futures) < 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        outputs = [future.result(timeout=5) for future in futures]
    finally:
        batcher.stop()
    assert ran_on == ["batcher-test-0", "batcher-test-0"]
    assert [out["length"].tolist() for out in outputs] == [[3], [4]]
    assert [run.size for run in session.runs] == [2]


def test_a_job_that_raises_stops_nothing_and_a_job_left_at_stop_is_refused_by_submit():
    session = RecordingSession(seconds=0.2)
    batcher = started(session, BatchOptions(max_size=1, instances=1))
    answered: list = []

    def broken() -> None:
        raise RuntimeError("a job that raises")

    def refused() -> None:
        try:
            batcher.submit([Sequence([1])], RequestState())
        except Exception as exc:
            answered.append(type(exc).__name__)

    batcher.call(broken)
    [future] = batcher.submit([Sequence([1, 2])], RequestState())
    time.sleep(0.05)  # its batch is running (0.2 s)
    batcher.call(refused)  # waits for the thread, which is running that batch
    stopping = threading.Thread(target=batcher.stop)
    stopping.start()
    time.sleep(0.05)
    with pytest.raises(Draining):  # once the batcher stops, no job is taken
        batcher.call(refused)
    stopping.join(timeout=5)
    assert future.result(timeout=5)["length"].tolist() == [2]  # the thread survived the broken job
    assert answered == ["Draining"]  # the job queued before the stop ran, and was told no
