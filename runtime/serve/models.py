"""A served model: its package, task spec, pipeline, sessions and batcher."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from kiln.runtime.manifest import MODEL_NAME
from kiln.runtime.package import load_package
from kiln.runtime.pipelines import Pipeline
from kiln.runtime.pipelines.base import Outputs, Prepared, split_row
from kiln.runtime.serve.aio import Wakeup
from kiln.runtime.serve.batcher import (
    CPU_BATCH_TOKENS,
    GPU_BATCH_TOKENS,
    Batcher,
    BatchOptions,
    BatchRecord,
    RequestState,
    row_error,
    when_all,
)
from kiln.runtime.serve.counted import Counted, Duration
from kiln.runtime.serve.metrics import Metrics
from kiln.runtime.session import PROVIDERS, SessionOptions, cpu_count, create_session
from kiln.runtime.tasks import TaskSpec, spec_for

if TYPE_CHECKING:
    import onnxruntime as ort

log = logging.getLogger("kiln.serve")
# A lone batch gets every core only where that is measurably faster than one core (timed at load).
# The int8 MiniLM classifier, one text: 2.6 ms on 2 cores, 3.1 ms on one. A 2-layer, 64-wide BERT
# runs as fast on one, and there the wide session's pool threads only spun for up to 2 ms after each
# run: ~1 ms of CPU a request at 64 h2load streams, taken from the event loop (bench/README.md).
WIDE_SPEEDUP = 1.15  # all cores must run a row at least this much faster than one
# A model whose row runs in less than this on one core gets one instance unless --instances says
# otherwise: one batcher thread already outruns what the server can hand it, and a second only
# contends for the interpreter lock (tiny BERT, 64 h2load streams: 941-1,017 requests/s at
# 1,270-1,365 us of CPU each with one, 847-850 at 1,496-1,520 with two; bench/README.md).
CHEAP_ROW_SECONDS = 0.0005
TIMED_RUNS = 7


class ServedModel(Counted):
    """On CPU with several instances the model has two sessions: the package's own, on every core,
    for a batch that runs alone (the lowest latency for a lone request), and a single-threaded one
    the instances share under load, so that batches run side by side, one per core, instead of
    splitting each op across cores (measured: more texts/s, since small ops scale poorly). A model
    too small to run faster on every core runs every batch on one (`WIDE_SPEEDUP`, timed at load)."""

    def __init__(
        self,
        name: str,
        path: Path,
        session: SessionOptions,
        batching: BatchOptions,
        metrics: Metrics,
        version: str = "1",
    ):
        started = time.monotonic()
        self.name, self.version, self.path = name, version, path
        self.package = load_package(path, session)
        self.manifest = self.package.manifest
        self.spec: TaskSpec = spec_for(self.manifest.task)
        self.provider = self.package.session.get_providers()[0]
        self.pipeline: Pipeline = self.spec.pipeline(self.package)  # prepares and finishes; runs go through us
        self.metrics = metrics
        super().__init__()
        on_cpu = self.provider == PROVIDERS["cpu"]
        auto_instances = batching.instances == 0
        batching = replace(
            batching,
            max_size=self.manifest.max_batch_size or batching.max_size,
            max_tokens=batching.max_tokens or (CPU_BATCH_TOKENS if on_cpu else GPU_BATCH_TOKENS),
            instances=batching.instances or (cpu_count() if on_cpu else 1),
        )
        self.narrow: ort.InferenceSession | None = None  # None: every batch runs on the package's session
        self.single_threaded = on_cpu and (session.intra_op_threads or cpu_count()) == 1
        if on_cpu and not self.single_threaded and batching.instances > 1:
            self.narrow = create_session(path / MODEL_NAME, replace(session, intra_op_threads=1))
        self.max_queue = batching.max_queue
        self._back: Wakeup | None = None  # answers of short requests go back to the loop through this
        warm_start = time.monotonic()
        timed, one_core_seconds = self._warm_up()
        self.all_cores_pay = timed if batching.lone_cores == "auto" else batching.lone_cores == "all"
        if auto_instances and on_cpu and one_core_seconds < CHEAP_ROW_SECONDS:
            batching = replace(batching, instances=1)
        self.warm_up_seconds = time.monotonic() - warm_start
        self.batcher = Batcher(name, self._run_batch, self._split, batching, self._record_batch)
        self.batcher.start()
        self.load_seconds = time.monotonic() - started
        log.info(
            "model loaded",
            extra={
                "fields": {
                    "model": name,
                    "version": version,
                    "task": self.manifest.task,
                    "precision": self.manifest.precision,
                    "provider": self.provider,
                    "max_batch_size": batching.max_size,
                    "instances": batching.instances,
                    "lone_batch_cores": "all" if self._on_all_cores(alone=True) else "one",
                    "load_s": round(self.load_seconds, 2),
                    "warm_up_s": round(self.warm_up_seconds, 3),
                    "path": str(path),
                }
            },
        )

    @property
    def options(self) -> BatchOptions:
        return self.batcher.options

    @property
    def sizes(self) -> dict[str, int]:
        """What symbolic output shapes resolve to for this model (labels, embedding width)."""
        last = self.package.session.get_outputs()[0].shape[-1]
        return {"labels": len(self.manifest.labels), "hidden": last if isinstance(last, int) else -1}

    def prepare_or_run(self, prepare: Any, request: RequestState) -> tuple[Prepared, Any, list[Future] | None]:
        """On a worker thread: prepare the request, then run it at once if the model is idle and it
        cannot gain from waiting (answers returned), else queue it (futures returned). A worker never
        waits for a batch."""
        prepared = self.timed_prepare(prepare, request)
        outputs = self.batcher.run_if_idle(prepared.encodings, request, self.others_in_progress)
        if outputs is None:
            return prepared, None, self.batcher.submit(prepared.encodings, request)
        return prepared, self.finish(prepared, outputs, request), None

    async def run(self, prepare: Any, request: RequestState, executor: Any, short: bool = False) -> Any:
        """prepare -> the batcher -> finish. A short request (a few short texts) is prepared on a
        batching thread and finished on the thread that ran its last batch, so the event loop only
        hands it over and takes its answer back (`_run_short`). Longer ones are prepared and
        finished on worker threads; the event loop only awaits."""
        loop = asyncio.get_running_loop()
        if short:
            return await self._run_short(prepare, request, loop)
        prepared, answers, futures = await loop.run_in_executor(executor, self.prepare_or_run, prepare, request)
        if futures is None:
            return answers
        outputs = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        return await loop.run_in_executor(executor, self.finish, prepared, list(outputs), request)

    async def _run_short(self, prepare: Any, request: RequestState, loop: asyncio.AbstractEventLoop) -> Any:
        """One hand-off each way: the batcher's thread tokenizes the request (tokenizers releases the
        GIL), queues its rows, and whichever thread settles the last row finishes the answers and
        hands them to the loop, one wake-up for all the answers a batch settles. A cancelled caller
        marks its request state (the data plane does), so its rows are dropped, never run."""
        answer = loop.create_future()
        back = self._wakeup(loop)
        company = self.others_in_progress  # read here: the data plane counts requests on the loop

        def reply(result: Any = None, error: BaseException | None = None) -> None:
            back.call(lambda: _settle_async(answer, result, error))

        def job() -> None:
            try:
                prepared = self.timed_prepare(prepare, request)
                futures = self.batcher.submit(prepared.encodings, request, company)
            except Exception as exc:  # invalid input, a stopping batcher: the caller's error
                reply(error=exc)
                return
            when_all(futures, lambda: self._finish_rows(prepared, futures, request, reply))

        self.batcher.call(job)
        return await answer

    def _finish_rows(self, prepared: Prepared, futures: list[Future], request: RequestState, reply: Any) -> None:
        """The request's answers, on whichever thread settled its last row."""
        try:
            error = row_error(futures)
            if error is not None:
                reply(error=error)
            else:
                reply(self.finish(prepared, [f.result() for f in futures], request))
        except Exception as exc:  # post-processing failed: the caller gets it, the thread goes on
            reply(error=exc)

    def _wakeup(self, loop: asyncio.AbstractEventLoop) -> Wakeup:
        """The way back to the loop that serves this model's requests (one per loop: tests run several)."""
        if self._back is None or self._back.loop is not loop:
            self._back = Wakeup(loop)
        return self._back

    def _split(self, outputs: dict[str, np.ndarray], row: int, length: int) -> dict[str, np.ndarray]:
        return split_row(outputs, row, length, self.pipeline.sequence_outputs)

    def _run_batch(self, sequences: Sequence[Any], alone: bool) -> dict[str, np.ndarray]:
        return self._run_padded(self.package.encoder.pad(list(sequences)), self._on_all_cores(alone))

    def _on_all_cores(self, alone: bool) -> bool:
        return self.narrow is None or (alone and self.all_cores_pay)

    def _run_padded(self, batch: Any, all_cores: bool) -> dict[str, np.ndarray]:
        if all_cores or self.narrow is None:
            return self.package.run(batch)
        outputs = self.manifest.outputs
        return dict(zip(outputs, self.narrow.run(outputs, batch.feeds), strict=True))

    async def run_tokens(self, sequences: list[Any], request: RequestState, executor: Executor) -> Outputs:
        """Pre-tokenized rows through the batcher (the token-id path)."""
        return await asyncio.get_running_loop().run_in_executor(executor, self._run_tokens, sequences, request)

    def _run_tokens(self, sequences: list[Any], request: RequestState) -> Outputs:
        outputs = self.batcher.run_if_idle(sequences, request, self.others_in_progress)
        if outputs is not None:
            return outputs
        return [future.result() for future in self.batcher.submit(sequences, request)]

    def _warm_up(self) -> tuple[bool, float]:
        """One pass through each session, so the first caller does not pay for lazy initialisation,
        then a row of 64 tokens timed: whether every core runs it `WIDE_SPEEDUP` faster than one
        (with two sessions), and its seconds on one core (on the only session, without two)."""
        sequence = self.package.encoder.tokenize(["warm up " * 32])[0]
        batch = self.package.encoder.pad([sequence])
        self._run_padded(batch, all_cores=True)
        if self.narrow is None:
            return True, _median_seconds(lambda: self._run_padded(batch, all_cores=True))
        self._run_padded(batch, all_cores=False)
        wide, narrow = (_median_seconds(lambda c=c: self._run_padded(batch, all_cores=c)) for c in (True, False))
        return wide * WIDE_SPEEDUP <= narrow, narrow

    def _record_batch(self, record: BatchRecord) -> None:
        labels = {"model": self.name}
        self.metrics.batch_size.labels(**labels).observe(record.size)
        cores = "all" if self._on_all_cores(record.alone) and not self.single_threaded else "one"
        self.metrics.batches.labels(model=self.name, cores=cores).inc()
        self.metrics.padded_tokens.labels(**labels).observe(record.padded_tokens)
        self.metrics.padding_ratio.labels(**labels).observe(1 - record.real_tokens / record.padded_tokens)
        self.metrics.stage_seconds.labels(model=self.name, stage="infer").observe(record.infer_seconds)
        for waited in record.queue_seconds:
            self.metrics.stage_seconds.labels(model=self.name, stage="queue").observe(waited)
        with self.stats.lock:
            self.stats.execution_count += 1
            self.stats.batches.setdefault(record.size, Duration()).add(record.infer_seconds)

    def stop(self) -> None:
        self.batcher.stop()


def _settle_async(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    """On the loop: a short request's answer, unless its caller has gone."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _median_seconds(run: Callable[[], Any], times: int = TIMED_RUNS) -> float:
    seconds = []
    for _ in range(times):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return sorted(seconds)[times // 2]
