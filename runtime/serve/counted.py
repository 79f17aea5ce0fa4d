"""What every served model keeps for the data plane, whichever process runs its rows: admission
control (`--max-queue`), the requests holding it, and Triton's statistics (ModelStatistics)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kiln.runtime.errors import InvalidInput, QueueFull
from kiln.runtime.pipelines.base import Outputs, Prepared
from kiln.runtime.serve.batcher import RequestState
from kiln.runtime.serve.metrics import Metrics

DEPTH_SECONDS = 0.005  # the queue-depth gauge is at most this stale while the model is busy


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9)


@dataclass
class Statistics:
    """Triton-style counters for ModelStatistics."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    batches: dict[int, Duration] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Counted:
    """What every served model keeps for the data plane: admission control, in-flight requests,
    Triton's statistics. A model sets name, version, metrics and `max_queue` before use."""

    name: str
    version: str
    metrics: Metrics
    max_queue: int

    def __init__(self) -> None:
        self.stats = Statistics()
        self.created = int(time.time())  # when this version was loaded (OpenAI's model `created`)
        self.in_flight = 0  # requests holding this model (a swapped-out version stops once none does)
        self.admitted = 0  # items accepted and not yet answered (admission control)
        self._depth_shown = 0.0  # when the queue-depth gauge was last written

    @property
    def others_in_progress(self) -> bool:
        """Whether requests besides the caller's hold the model (read on a worker thread; the data
        plane counts them on the event loop): only then can waiting for company pay."""
        return self.in_flight > 1

    @property
    def healthy(self) -> bool:
        """Whether the model can serve now (a generator is not while its decoding loop restarts)."""
        return True

    def admit(self, items: int) -> None:
        """Admission control, on the event loop: every item accepted and not yet answered counts
        (waiting for a worker, being prepared, queued for a batch, running, being finished), so
        `--max-queue` bounds all the work the model holds; past it a request is refused at once."""
        limit = self.max_queue
        if items > limit:
            raise InvalidInput(
                f"request has {items} items; model {self.name} takes at most {limit} in one request (--max-queue)"
            )
        if self.admitted + items > limit:
            raise QueueFull(
                f"model {self.name}: {self.admitted} items in progress, limit {limit} (--max-queue); retry later"
            )
        self.admitted += items
        self._show_depth()

    def release(self, items: int) -> None:
        self.admitted -= items
        self._show_depth()

    def _show_depth(self) -> None:
        """The queue-depth gauge, written at most every DEPTH_SECONDS, and whenever the model falls
        idle (so it never shows work that is gone): with several processes each write is a locked
        write to a shared file, and two per request were a fifth of the engine loop's time."""
        now = time.monotonic()
        if self.admitted == 0 or now - self._depth_shown >= DEPTH_SECONDS:
            self._depth_shown = now
            self.metrics.queue_depth.labels(model=self.name).set(self.admitted)

    def record_result(self, ok: bool, seconds: float, count: int, stages: Mapping[str, float]) -> None:
        """One request's outcome in Triton's statistics. As Triton counts them, every stage counts a
        successful request once (perf_analyzer checks that the compute counts agree); a request's
        rows that ran in several batches add their batches' times."""
        with self.stats.lock:
            (self.stats.success if ok else self.stats.fail).add(seconds)
            if ok:
                self.stats.inference_count += count
                self.stats.last_inference_ms = int(time.time() * 1000)
                for stage in ("queue", "compute_input", "compute_infer", "compute_output"):
                    getattr(self.stats, stage).add(stages.get(stage, 0.0))

    def timed_prepare(self, prepare: Callable[[], Prepared], request: RequestState) -> Prepared:
        """Validate and tokenize, timed as Triton's compute_input."""
        start = time.monotonic()
        prepared = prepare()
        self._observe("tokenize", start, request, "compute_input")
        return prepared

    def finish(self, prepared: Prepared, outputs: Outputs, request: RequestState) -> Any:
        start = time.monotonic()
        answers = prepared.finish(outputs)
        self._observe("postprocess", start, request, "compute_output")
        return answers

    def _observe(self, stage: str, start: float, request: RequestState, statistic: str) -> None:
        """A stage that began at `start` and ends now: in the metrics and in the request's stages."""
        end = time.monotonic()
        self.metrics.stage_seconds.labels(model=self.name, stage=stage).observe(end - start)
        request.add_stage(statistic, start, end)

    async def collected_statistics(self) -> dict[str, Any]:
        """Triton's statistics of this model over the whole server (a front-end asks the engine)."""
        return self.statistics()

    def statistics(self) -> dict[str, Any]:
        """Triton's per-model statistics, in their JSON form."""

        def d(duration: Duration) -> dict[str, int]:
            return {"count": duration.count, "ns": duration.ns}

        s = self.stats
        with s.lock:
            return {
                "name": self.name,
                "version": self.version,
                "last_inference": s.last_inference_ms,
                "inference_count": s.inference_count,
                "execution_count": s.execution_count,
                "inference_stats": {
                    stage: d(getattr(s, stage))
                    for stage in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
                },
                "batch_stats": [
                    {"batch_size": size, "compute_infer": d(duration)} for size, duration in sorted(s.batches.items())
                ],
            }
