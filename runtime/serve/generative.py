"""A served generator: its package, the continuous-batching scheduler, and requests as streams
of text pieces handed from the decoding thread to the caller's event loop."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kiln.runtime.errors import Cancelled, DeadlineExceeded, InternalError
from kiln.runtime.generation.decoding import FINISH_CANCELLED, Decoding, Piece, Sequence
from kiln.runtime.generation.package import load_generator
from kiln.runtime.pipelines.text_generation import Generated, GenerationPipeline
from kiln.runtime.serve.batcher import BatchOptions, RequestState
from kiln.runtime.serve.metrics import Metrics
from kiln.runtime.serve.models import Counted
from kiln.runtime.serve.scheduler import Scheduler, StepRecord
from kiln.runtime.session import SessionOptions
from kiln.runtime.tasks import TaskSpec, spec_for
from kiln.runtime.tasks.generation import settings_of

log = logging.getLogger("kiln.serve")


@dataclass
class Chunk:
    """A piece of a streamed answer as protocols send it; the last has the finish reason and counts."""

    text: str
    tokens: int
    finish_reason: str | None = None
    prompt_tokens: int = 0
    generated_tokens: int = 0
    truncated: bool = False


@dataclass
class Stream:
    """One prompt being generated for a caller: pieces arrive on `queue` from the decoding thread."""

    sequence: Sequence | None
    queue: asyncio.Queue
    truncated: bool
    prompt_tokens: int
    prefix: str = ""  # text-generation's return_full_text: the prompt, sent before the new text

    def cancel(self) -> None:
        if self.sequence is not None:
            self.sequence.cancelled = True


class GenerativeModel(Counted):
    def __init__(
        self,
        name: str,
        path: Path,
        session: SessionOptions,
        batching: BatchOptions,
        metrics: Metrics,
        version: str = "1",
    ):
        super().__init__()
        started = time.monotonic()
        self.name, self.version, self.path, self.metrics = name, version, path, metrics
        self.generator = load_generator(path, session)
        self.manifest = self.generator.manifest
        self.spec: TaskSpec = spec_for(self.manifest.task)
        self.pipeline: GenerationPipeline = self.spec.pipeline(self.generator)  # type: ignore[call-arg]
        self.provider = next(iter(self.generator.sessions.values())).get_providers()[0]
        self.options = replace(batching, max_size=min(batching.max_size, batching.max_generating))
        self.max_queue = batching.max_queue
        decoding = Decoding(self.generator.decoder, self.generator.start_id)
        self.scheduler = Scheduler(decoding, self.options.max_size, batching.max_cache_tokens, self._record_step)
        self.scheduler.start()
        self.pipeline.generate(["warm up"], {"max_new_tokens": 2, "do_sample": False, "num_beams": 1})
        self.load_seconds = time.monotonic() - started
        log.info(
            "model loaded",
            extra={
                "fields": {
                    "model": name,
                    "version": version,
                    "task": self.manifest.task,
                    "load_s": round(self.load_seconds, 2),
                    "path": str(path),
                }
            },
        )

    @property
    def sizes(self) -> dict[str, int]:
        return {}

    def raw_outputs(self) -> list[tuple[str, list[int]]]:
        return []

    def open(self, text: str, params: dict[str, Any], loop: asyncio.AbstractEventLoop) -> Stream:
        """Tokenize a prompt and hand it to the scheduler (beam search runs on its own, later)."""
        settings = self.generator.settings(settings_of(params))
        ids, truncated = self.generator.encode(text, bool(params.get("truncate")))
        queue: asyncio.Queue = asyncio.Queue()
        full = params.get("return_full_text")
        prefix = text if self.generator.decoder_only and (full is None or full) else ""
        if settings.num_beams > 1:
            return Stream(None, queue, truncated, len(ids), prefix)

        def deliver(piece: Piece) -> None:  # on the decoding thread
            loop.call_soon_threadsafe(queue.put_nowait, piece)

        sequence = self.generator.sequence(ids, settings, deliver)
        self.scheduler.submit([sequence])
        return Stream(sequence, queue, truncated, len(ids), prefix)

    async def pieces(
        self, stream: Stream, text: str, params: dict[str, Any], state: RequestState, executor: Any
    ) -> AsyncIterator[Piece]:
        """The stream's pieces until the last; cancelling the caller or its deadline frees the row."""
        if stream.sequence is None:  # beam search: one answer, computed on a worker thread
            answer = await asyncio.get_running_loop().run_in_executor(executor, self._beam, text, params)
            yield Piece(answer.text, answer.tokens, answer.finish_reason)
            return
        try:
            while True:
                timeout = None if state.deadline is None else max(state.deadline - time.monotonic(), 0)
                piece = await asyncio.wait_for(stream.queue.get(), timeout)
                if piece.finish_reason == "error":
                    raise InternalError("the decoding step failed (see the server log)")
                self.metrics.generated_tokens.labels(model=self.name).inc(piece.tokens)
                yield piece
                if piece.finish_reason is not None:
                    return
        except TimeoutError as exc:
            raise DeadlineExceeded("deadline passed while generating; the sequence was stopped") from exc
        finally:
            stream.cancel()  # a caller that went away frees its row at the next step

    async def answer(
        self, texts: list[str], params: dict[str, Any], state: RequestState, executor: Any
    ) -> list[Generated]:
        """Whole answers for several prompts, generated side by side."""
        loop = asyncio.get_running_loop()
        streams = [self.open(text, params, loop) for text in texts]
        try:
            return list(
                await asyncio.gather(
                    *(self._collect(s, t, params, state, executor) for s, t in zip(streams, texts, strict=True))
                )
            )
        finally:
            for stream in streams:
                stream.cancel()

    async def _collect(
        self, stream: Stream, text: str, params: dict[str, Any], state: RequestState, executor: Any
    ) -> Generated:
        parts, tokens, reason = [stream.prefix], 0, FINISH_CANCELLED
        async for piece in self.pieces(stream, text, params, state, executor):
            parts.append(piece.text)
            tokens += piece.tokens
            reason = piece.finish_reason or reason
        if reason == FINISH_CANCELLED:
            raise Cancelled("request was cancelled")
        return Generated("".join(parts), stream.prompt_tokens, tokens, reason, stream.truncated)

    def _beam(self, text: str, params: dict[str, Any]) -> Generated:
        call = {k: v for k, v in params.items() if v is not None and k != "return_full_text"}
        return self.pipeline.generate([text], call)[0]

    def _record_step(self, record: StepRecord) -> None:
        self.metrics.decoding_rows.labels(model=self.name).observe(record.rows)
        self.metrics.cache_tokens.labels(model=self.name).set(record.cache_tokens)
        self.metrics.stage_seconds.labels(model=self.name, stage="decode_step").observe(record.seconds)
        with self.stats.lock:
            self.stats.execution_count += 1
            self.stats.compute_infer.add(record.seconds)

    def stop(self) -> None:
        self.scheduler.stop()
