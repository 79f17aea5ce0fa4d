"""A served model: its package, its pipeline, its batcher and its statistics."""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from kiln.runtime import pipeline as make_pipeline
from kiln.runtime.manifest import MODEL_NAME
from kiln.runtime.package import load_package
from kiln.runtime.pipelines import Pipeline
from kiln.runtime.serve.batcher import Batcher, BatchOptions, BatchRecord, RequestState
from kiln.runtime.serve.metrics import Metrics
from kiln.runtime.session import PROVIDERS, SessionOptions, cpu_count, create_session

log = logging.getLogger("kiln.serve")

# the call a worker thread is serving; set per request, read by the pipeline's runner
current_request: contextvars.ContextVar[RequestState] = contextvars.ContextVar("current_request")


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


class ServedModel:
    """On CPU with several instances the model has two sessions: the package's own, on every core,
    for a batch that runs alone (the lowest latency for a lone request), and a single-threaded one
    the instances share under load, so that batches run side by side, one per core, instead of
    splitting each op across cores (measured: more texts/s, since small ops scale poorly)."""

    def __init__(self, name: str, path: Path, session: SessionOptions, batching: BatchOptions, metrics: Metrics):
        started = time.monotonic()
        self.name = name
        self.path = path
        self.package = load_package(path, session)
        self.manifest = self.package.manifest
        self.provider = self.package.session.get_providers()[0]
        self.pipeline: Pipeline = make_pipeline(self.package)
        self.metrics = metrics
        self.stats = Statistics()
        on_cpu = self.provider == PROVIDERS["cpu"]
        batching = replace(
            batching,
            max_size=self.manifest.max_batch_size or batching.max_size,
            instances=batching.instances or (cpu_count() if on_cpu else 1),
        )
        self.narrow: ort.InferenceSession | None = None  # None: every batch runs on the package's session
        self.single_threaded = on_cpu and (session.intra_op_threads or cpu_count()) == 1
        if on_cpu and not self.single_threaded and batching.instances > 1:
            self.narrow = create_session(path / MODEL_NAME, replace(session, intra_op_threads=1))
        self.batcher = Batcher(name, self._run_batch, self.pipeline.item, batching, self._record_batch)
        self.pipeline.runner = self.run_sequences
        self.batcher.start()
        warm_start = time.monotonic()
        self._warm_up()
        self.warm_up_seconds = time.monotonic() - warm_start
        self.load_seconds = time.monotonic() - started
        log.info(
            "model loaded",
            extra={
                "fields": {
                    "model": name,
                    "task": self.manifest.task,
                    "precision": self.manifest.precision,
                    "provider": self.provider,
                    "max_batch_size": batching.max_size,
                    "instances": batching.instances,
                    "load_s": round(self.load_seconds, 2),
                    "warm_up_s": round(self.warm_up_seconds, 3),
                    "path": str(path),
                }
            },
        )

    def _run_batch(self, sequences: list[Any], alone: bool) -> dict[str, np.ndarray]:
        batch = self.package.encoder.pad(sequences)
        if alone or self.narrow is None:
            return self.package.run(batch)
        outputs = self.manifest.outputs
        return dict(zip(outputs, self.narrow.run(outputs, batch.feeds), strict=True))

    def run_sequences(self, sequences: list[Any]) -> list[dict[str, np.ndarray]]:
        """Sequences of the current request through the batcher (called on a worker thread)."""
        request = current_request.get()
        request.timings["submitted"] = time.monotonic()
        outputs = self.batcher.run(sequences, request)
        request.timings["returned"] = time.monotonic()
        return outputs

    def _warm_up(self) -> None:
        """One pass through the session, so the first caller does not pay for lazy initialisation."""
        sequence = self.package.encoder.encode(["warm up"])[0]
        self._run_batch([sequence], alone=True)
        if self.narrow is not None:
            self._run_batch([sequence], alone=False)

    def _record_batch(self, record: BatchRecord) -> None:
        labels = {"model": self.name}
        self.metrics.batch_size.labels(**labels).observe(record.size)
        on_narrow = self.narrow is not None and not record.alone
        cores = "one" if on_narrow or self.single_threaded else "all"
        self.metrics.batches.labels(model=self.name, cores=cores).inc()
        self.metrics.padded_tokens.labels(**labels).observe(record.padded_tokens)
        self.metrics.padding_ratio.labels(**labels).observe(1 - record.real_tokens / record.padded_tokens)
        self.metrics.stage_seconds.labels(model=self.name, stage="infer").observe(record.infer_seconds)
        for waited in record.queue_seconds:
            self.metrics.stage_seconds.labels(model=self.name, stage="queue").observe(waited)
        self.metrics.queue_depth.labels(**labels).set(self.batcher.depth)
        with self.stats.lock:
            self.stats.execution_count += 1
            self.stats.compute_infer.add(record.infer_seconds)
            self.stats.queue.add(sum(record.queue_seconds), len(record.queue_seconds))
            self.stats.batches.setdefault(record.size, Duration()).add(record.infer_seconds)

    def call(self, fn: Any, request: RequestState) -> Any:
        """Run fn (a pipeline call) on this worker thread, as `request`; record its stages."""
        token = current_request.set(request)
        start = time.monotonic()
        try:
            result = fn()
        finally:
            current_request.reset(token)
        end = time.monotonic()
        submitted = request.timings.get("submitted", start)
        returned = request.timings.get("returned", end)
        self.metrics.stage_seconds.labels(model=self.name, stage="tokenize").observe(submitted - start)
        self.metrics.stage_seconds.labels(model=self.name, stage="postprocess").observe(end - returned)
        with self.stats.lock:
            self.stats.compute_input.add(submitted - start)
            self.stats.compute_output.add(end - returned)
        return result

    def record_result(self, ok: bool, seconds: float, count: int) -> None:
        with self.stats.lock:
            (self.stats.success if ok else self.stats.fail).add(seconds)
            if ok:
                self.stats.inference_count += count
                self.stats.last_inference_ms = int(time.time() * 1000)

    def stop(self) -> None:
        self.batcher.stop()
