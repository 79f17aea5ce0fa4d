"""A served generator: its package, the continuous-batching scheduler, and requests as streams
of text pieces handed from the decoding thread to the caller's event loop."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kiln.runtime.errors import Cancelled, DeadlineExceeded, InternalError
from kiln.runtime.generation.decoding import FINISH_CANCELLED, FINISH_ERROR, Decoding, Piece, Sequence
from kiln.runtime.generation.package import Generator, load_generator
from kiln.runtime.generation.settings import Settings
from kiln.runtime.pipelines.text_generation import GenerationPipeline
from kiln.runtime.serve.aio import all_or_none
from kiln.runtime.serve.batcher import BatchOptions, RequestState
from kiln.runtime.serve.counted import Counted
from kiln.runtime.serve.metrics import Metrics
from kiln.runtime.serve.scheduler import Scheduler, StepRecord
from kiln.runtime.session import SessionOptions
from kiln.runtime.tasks import TaskSpec, spec_for
from kiln.runtime.tasks.generation import settings_of

log = logging.getLogger("kiln.serve")


@dataclass
class Stream:
    """One prompt being generated for a caller: pieces arrive on `queue` from the decoding thread
    (a beam search's one answer comes from the model's beam thread instead)."""

    sequence: Sequence
    queue: asyncio.Queue
    truncated: bool
    prefix: str = ""  # text-generation's return_full_text: the prompt, sent before the new text
    search: Future[Piece] | None = None  # a beam search's answer, from the beam thread
    opened: float = field(default_factory=time.monotonic)  # when it was admitted (Triton's compute_infer)

    @property
    def request_id(self) -> str:
        return self.sequence.request_id

    @property
    def prompt_tokens(self) -> int:
        return len(self.sequence.prompt)

    def cancel(self) -> None:
        self.sequence.cancelled = True


class Generative(Counted, ABC):
    """What the data plane asks of a generator, wherever it decodes: in this process
    (`GenerativeModel`) or in the engine process of `--frontends N` (`frontend.RemoteGenerator`).
    A request opens one stream per prompt (taken whole or refused whole) and reads each stream's
    pieces; whole answers are the pieces collected."""

    spec: TaskSpec
    generator: Generator  # its tokenizer, default settings and chat template

    @abstractmethod
    async def open(self, texts: list[str], params: dict[str, Any], state: RequestState) -> list[Any]:
        """A stream per prompt (each with `prefix`, `prompt_tokens`, `truncated` and `cancel()`)."""

    @abstractmethod
    def pieces(self, stream: Any, state: RequestState) -> AsyncIterator[Piece]:
        """The stream's pieces until the last (which has the finish reason)."""

    def settings_for(self, raw_params: dict[str, Any]) -> Settings:
        """What a request's parameters mean for this model (its defaults filled in), checked."""
        return self.generator.settings(settings_of(self.spec.parse_params(raw_params)))

    async def answer(self, texts: list[str], params: dict[str, Any], state: RequestState) -> list[Piece]:
        """Whole answers for several prompts, generated side by side; whatever the request opened
        is cancelled on every way out (an error in one prompt, the caller leaving, the deadline)."""
        streams = await self.open(texts, params, state)
        try:
            return await all_or_none(*(self._collect(stream, state) for stream in streams))
        finally:
            for stream in streams:
                stream.cancel()

    async def _collect(self, stream: Any, state: RequestState) -> Piece:
        parts, tokens, reason = [stream.prefix], 0, FINISH_CANCELLED
        async for piece in self.pieces(stream, state):
            parts.append(piece.text)
            tokens += piece.tokens
            reason = piece.finish_reason or reason
        if reason == FINISH_CANCELLED:
            raise Cancelled("request was cancelled")
        return Piece.whole("".join(parts), stream.prompt_tokens, tokens, reason, stream.truncated)


class GenerativeModel(Generative):
    def __init__(
        self,
        name: str,
        path: Path,
        session: SessionOptions,
        batching: BatchOptions,
        metrics: Metrics,
        version: str = "1",
        chat_template: Path | None = None,
    ):
        super().__init__()
        started = time.monotonic()
        self.name, self.version, self.path, self.metrics = name, version, path, metrics
        self.generator = load_generator(path, session, chat_template=chat_template)
        self.manifest = self.generator.manifest
        self.spec: TaskSpec = spec_for(self.manifest.task)
        self.pipeline: GenerationPipeline = self.spec.pipeline(self.generator)  # type: ignore[call-arg]
        self.provider = next(iter(self.generator.sessions.values())).get_providers()[0]
        self.options = replace(batching, max_size=min(batching.max_size, batching.max_generating))
        self.max_queue = batching.max_queue
        decoding = Decoding(self.generator.decoder, self.generator.start_id)
        self.scheduler = Scheduler(decoding, self.options.max_size, batching.max_cache_tokens, self._record_step, name)
        self.scheduler.start()
        self.beam_thread = ThreadPoolExecutor(1, f"kiln-beam-{name}")
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

    async def open(self, texts: list[str], params: dict[str, Any], state: RequestState) -> list[Stream]:
        """Tokenize and check every prompt, then admit them all at once: a request is taken whole or
        refused whole, so nothing of a refused request is left generating or holding the KV cache.
        Beam searches are queued on the model's beam thread here too, each holding its share of the
        budget until it ends (or at once, if it never starts)."""
        settings = self.generator.settings(settings_of(params))
        truncate, full = bool(params.get("truncate")), params.get("return_full_text")
        loop = asyncio.get_running_loop()
        streams = []
        started = time.monotonic()
        for text in texts:
            ids, truncated = self.generator.tokenize(text, truncate, params.get("add_special_tokens") is not False)
            queue: asyncio.Queue = asyncio.Queue()
            sequence = self.generator.sequence(ids, settings, _deliver_to(queue, loop))
            sequence.request_id = uuid.uuid4().hex[:12]
            prefix = text if self.generator.decoder_only and (full is None or full) else ""
            streams.append(Stream(sequence, queue, truncated, prefix))
        state.add_stage("compute_input", started, time.monotonic())
        if settings.num_beams == 1:
            self.scheduler.submit([stream.sequence for stream in streams])
            return streams
        self.scheduler.reserve(sum(self._beam_cost(stream.sequence) for stream in streams))
        for stream in streams:
            stream.search = self.beam_thread.submit(self._search, stream, state)
            share = self._beam_cost(stream.sequence)
            stream.search.add_done_callback(lambda _, share=share: self.scheduler.release(share))
        return streams

    async def pieces(self, stream: Stream, state: RequestState) -> AsyncIterator[Piece]:
        """The stream's pieces until the last; cancelling the caller or its deadline frees the row."""
        try:
            if stream.search is not None:
                answer = await asyncio.wait_for(asyncio.wrap_future(stream.search), _remaining(state))
                yield Piece(answer.text, answer.tokens, answer.finish_reason)
                return
            while True:
                piece = await asyncio.wait_for(stream.queue.get(), _remaining(state))
                if piece.finish_reason == FINISH_ERROR:
                    raise InternalError(
                        f"generation failed in a decoding step (request {stream.request_id}): "
                        f"{_described(stream.sequence.error)}; the server log has the traceback"
                    )
                self.metrics.generated_tokens.labels(model=self.name).inc(piece.tokens)
                yield piece
                if piece.finish_reason is not None:
                    return
        except TimeoutError as exc:
            raise DeadlineExceeded("deadline passed while generating; the sequence was stopped") from exc
        finally:
            stream.cancel()  # a caller that went away frees its row (or stops its beam search) at the next step
            state.add_stage("compute_infer", stream.opened, time.monotonic())

    def _search(self, stream: Stream, state: RequestState) -> Piece:
        """One prompt's beam search, on the beam thread (never the pool that tokenizes for other
        models), checking the caller and the deadline before every step."""
        sequence = stream.sequence

        def stop_if_unwanted() -> None:
            if sequence.cancelled or state.cancelled:
                raise Cancelled("request was cancelled")
            if state.deadline is not None and time.monotonic() > state.deadline:
                raise DeadlineExceeded("deadline passed during beam search; the search was stopped")

        return self.pipeline.beam(sequence.prompt, sequence.settings, stream.truncated, stop_if_unwanted)

    @staticmethod
    def _beam_cost(sequence: Sequence) -> int:
        return Scheduler.cost(sequence) * sequence.settings.num_beams

    def _record_step(self, record: StepRecord) -> None:
        self.metrics.decoding_rows.labels(model=self.name).observe(record.rows)
        self.metrics.cache_tokens.labels(model=self.name).set(record.cache_tokens)
        self.metrics.stage_seconds.labels(model=self.name, stage="decode_step").observe(record.seconds)
        with self.stats.lock:
            self.stats.execution_count += 1

    @property
    def healthy(self) -> bool:
        """False while the decoding loop is restarting after a failure (readiness NOT_SERVING)."""
        return self.scheduler.alive

    def stop(self) -> None:
        self.scheduler.stop()
        self.beam_thread.shutdown(wait=True, cancel_futures=True)


def _deliver_to(queue: asyncio.Queue, loop: asyncio.AbstractEventLoop) -> Callable[[Piece], None]:
    def deliver(piece: Piece) -> None:  # on the decoding thread
        loop.call_soon_threadsafe(queue.put_nowait, piece)

    return deliver


def _remaining(state: RequestState) -> float | None:
    return None if state.deadline is None else max(state.deadline - time.monotonic(), 0)


def _described(error: BaseException | None) -> str:
    return "unknown error" if error is None else f"{type(error).__name__}: {error}"
