"""The protocol-neutral data plane: every protocol (KServe gRPC and REST, kiln.v1, OpenAI
embeddings) is a thin adapter over this, as KServe's dataplane.py sits under its servicers.

It owns what a request goes through whatever it arrived on: finding the model (and version),
draining, deadlines, reading inputs and parameters through the task's spec, running it (prepare,
batcher, finish), the outputs, statistics and metrics. Errors are kiln's own (`KilnError`); each
protocol maps them once (`kiln.runtime.serve.status`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from kiln.runtime.errors import Draining, InternalError, InvalidInput, KilnError
from kiln.runtime.generation.decoding import Piece
from kiln.runtime.serve import describe
from kiln.runtime.serve.batcher import RequestState
from kiln.runtime.serve.generative import Generative
from kiln.runtime.serve.kserve_codec import CODECS as KSERVE
from kiln.runtime.serve.metrics import Metrics
from kiln.runtime.serve.models import ServedModel
from kiln.runtime.serve.repository import Repository
from kiln.runtime.serve.tensors import classification
from kiln.runtime.serve.tokens import pad_outputs, read_token_rows
from kiln.runtime.serve.tracing import Tracing
from kiln.runtime.tasks import Texts
from kiln.runtime.tasks.generation import GenerateRequest, read_request

Served = ServedModel | Generative  # what a repository holds (a front-end's: frontend.RemoteModel too)

log = logging.getLogger("kiln.serve")
VERSION = "0.2.0"
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
EXTENSIONS = ["classification", "model_configuration", "statistics", "model_repository", "binary_tensor_data"]
# a request whose texts add up to no more characters than this is tokenized on the model's batching
# thread (a front-end's: on its loop), not handed to a worker thread (see ServedModel.run)
SHORT_REQUEST_CHARS = 2048


@dataclass
class InferRequest:
    """A KServe v2 inference request, decoded from whichever protocol carried it."""

    model: str
    version: str = ""
    inputs: dict[str, np.ndarray] = field(default_factory=dict)  # BYTES as object arrays of bytes
    parameters: dict[str, Any] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)  # requested; empty: all
    id: str = ""
    classification: dict[str, Any] = field(default_factory=dict)  # output -> class count (Triton's extension)


@dataclass
class InferResponse:
    model: str
    version: str
    id: str
    outputs: dict[str, np.ndarray]


@dataclass
class Call:
    """What a protocol knows about the call carrying a request."""

    api: str  # kserve | kserve-http | Classify | ... | openai (a metric label)
    timeout: float | None = None  # seconds the caller allows, None: the server's default
    model: str = ""  # the model asked for, once the protocol has read it (a metric label)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # the caller's X-Request-ID, else ours
    recorded: bool = False  # the model's Triton statistics have this request (it was admitted)
    code: str | None = None  # an error answered inside a response already started (an SSE error event)


@dataclass
class Answered:
    """A task's answers, with what the protocol needs to phrase them."""

    model: Served
    answers: Any
    params: dict[str, Any]
    tokens: int


class DataPlane:
    def __init__(
        self,
        repository: Repository,
        executor: Executor,
        metrics: Metrics,
        default_deadline: float | None,
        access_log: bool = False,
        tracing: Tracing | None = None,
    ):
        self.repository = repository
        self.executor = executor
        self.metrics = metrics
        self.default_deadline = default_deadline
        self.access_log = access_log  # a log line per request (`kiln serve --access-log`)
        self.tracing = tracing  # None unless `--trace-endpoint`
        self.draining = False
        self.answered = 0  # requests answered successfully, over the server's life (logged at stop)

    # ---- health and metadata -------------------------------------------------------------------

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return not self.draining and self.repository.any_ready()

    def model_ready(self, name: str, version: str = "") -> bool:
        return not self.draining and self.repository.ready(name, version)

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "kiln", "version": VERSION, "extensions": EXTENSIONS}

    def model(self, name: str, version: str = "") -> Served:
        return self.repository.get(name, version)

    def model_metadata(self, name: str, version: str = "") -> dict[str, Any]:
        return describe.metadata(self.repository.get(name, version))

    def model_config(self, name: str, version: str = "") -> dict[str, Any]:
        return describe.config(self.repository.get(name, version))

    async def statistics(self, name: str = "", version: str = "") -> dict[str, Any]:
        """Triton's model statistics (JSON form) for one model, or every model when no name is given."""
        models = [self.repository.get(name, version)] if name else list(self.repository.models.values())
        return {"model_stats": [await m.collected_statistics() for m in models]}

    # ---- inference ------------------------------------------------------------------------------

    async def infer(self, model: Served, request: InferRequest, call: Call) -> InferResponse:
        """Text in BYTES tensors through the task, or token ids through the graph, on the model the
        protocol found with `model_for`."""
        if model.spec.generative:
            answered = await self._generate(model, read_request(request.inputs, request.parameters), call)
            outputs = KSERVE[model.spec.task].to_tensors(answered.answers, answered.params)
        elif any(name in request.inputs for name in TOKEN_INPUTS):
            rows = len(request.inputs.get("input_ids", ()))
            outputs = await self._timed(model, call, rows, lambda state: self._tokens(model, request.inputs, state))
        else:
            spec = model.spec
            texts = spec.read_texts(request.inputs)
            params = spec.parse_params(request.parameters)
            answered = await self._answer(model, texts, params, call)
            outputs = KSERVE[spec.task].to_tensors(answered.answers, params)
        outputs = _requested(outputs, request.outputs)
        for name, count in request.classification.items():
            outputs[name] = classification(outputs[name], count, list(model.manifest.labels), name)
        return InferResponse(model.name, model.version, request.id, outputs)

    async def answer(self, model: Served, texts: Texts, raw_params: Mapping[str, Any], call: Call) -> Answered:
        """A task's answers for texts already named by input (the typed API, OpenAI embeddings), from
        the model the protocol found with `model_for` (one lookup per request)."""
        if model.spec.generative:  # the typed Generate RPC
            return await self._generate(model, GenerateRequest(texts["text_input"], dict(raw_params)), call)
        return await self._answer(model, texts, model.spec.parse_params(raw_params), call)

    def model_for(self, name: str, version: str, call: Call) -> Served:
        """The model a request is for, unless the server is draining or serves no such model."""
        if self.draining:
            raise Draining("server is shutting down; retry on another replica")
        return self.repository.get(name, version)

    @contextlib.asynccontextmanager
    async def counted(self, call: Call) -> AsyncIterator[Call]:
        """One request, counted once with its outcome whatever ends it: refused while its protocol
        decoded it, while its task read it or at admission, failed, cancelled, or answered. Every
        protocol wraps each request in this, so an error-rate alert sees refusals; a refused request
        the model never admitted still counts as a failure in its Triton statistics."""
        started = time.monotonic()
        code = "INTERNAL"
        try:
            yield call
            code = call.code or "OK"
        except (asyncio.CancelledError, GeneratorExit):
            code = "CANCELLED"
            raise
        except KilnError as exc:
            code = exc.grpc_status
            raise
        finally:
            self.count(call, code)
            if code != "OK" and not call.recorded and self.repository.knows(call.model):
                with contextlib.suppress(KilnError):
                    self.repository.get(call.model).record_result(False, time.monotonic() - started, 0, {})
            if self.access_log:
                fields = {"model": call.model, "api": call.api, "code": code, "request_id": call.request_id}
                fields["ms"] = round((time.monotonic() - started) * 1000, 2)
                log.info("request", extra={"fields": fields})

    async def _answer(self, model: ServedModel, texts: Texts, params: dict[str, Any], call: Call) -> Answered:
        rows = len(texts.get(model.spec.rows_input, ()))
        tokens: list[int] = []

        def prepare() -> Any:
            prepared = model.spec.prepare(model.pipeline, texts, params)
            tokens.append(sum(len(e.ids) for e in prepared.encodings))
            return prepared

        short = sum(len(text) for values in texts.values() for text in values) <= SHORT_REQUEST_CHARS
        work = lambda state: model.run(prepare, state, self.executor, short)  # noqa: E731
        answers = await self._timed(model, call, rows, work)
        return Answered(model, answers, params, tokens[0] if tokens else 0)

    async def _timed(self, model: Served, call: Call, rows: int, work: Any) -> Any:
        """Run work(request state) as one request of `model` (see `_request`)."""
        async with self._request(model, call, rows) as state:
            return await work(state)

    @contextlib.asynccontextmanager
    async def _request(self, model: Served, call: Call, rows: int) -> AsyncIterator[RequestState]:
        """One request of `model`, however it answers (at once or as a stream): admission,
        deadline, statistics, metrics, and an internal error logged with a request id that the
        caller also gets."""
        started = time.monotonic()
        timeout = call.timeout if call.timeout is not None else self.default_deadline
        state = RequestState(deadline=started + timeout if timeout else None, spans=[] if self.tracing else None)
        model.admit(rows)
        call.recorded = True
        model.in_flight += 1
        try:
            yield state
        except (asyncio.CancelledError, GeneratorExit):  # the caller went away: what is still queued is dropped
            state.cancelled = True
            model.record_result(False, time.monotonic() - started, rows, state.stages)
            raise
        except KilnError:
            model.record_result(False, time.monotonic() - started, rows, state.stages)
            raise
        except Exception as exc:
            log.exception("model %s: %s request %s failed", model.name, call.api, call.request_id)
            model.record_result(False, time.monotonic() - started, rows, state.stages)
            raise InternalError(f"internal error (request {call.request_id}): {type(exc).__name__}: {exc}") from exc
        finally:
            model.in_flight -= 1
            model.release(rows)
            if self.tracing is not None and state.spans:
                attributes = {"kiln.model": model.name, "kiln.rows": rows, "kiln.request_id": call.request_id}
                self.tracing.record(state.spans, attributes)
        elapsed = time.monotonic() - started
        self.answered += 1
        model.record_result(True, elapsed, rows, state.stages)
        self.metrics.request_seconds.labels(model=model.name).observe(elapsed)

    # ---- generation -----------------------------------------------------------------------------

    async def generate(self, model: Served, request: GenerateRequest, call: Call) -> Answered:
        """Whole answers for a generator's prompts (unary protocols)."""
        return await self._generate(_generator(model), request, call)

    async def _generate(self, model: Generative, request: GenerateRequest, call: Call) -> Answered:
        params = model.spec.parse_params(request.params)
        work = lambda state: model.answer(request.prompts, params, state)  # noqa: E731
        answers = await self._timed(model, call, len(request.prompts), work)
        return Answered(model, answers, params, sum(a.prompt_tokens for a in answers))

    async def generate_stream(self, served: Served, request: GenerateRequest, call: Call) -> AsyncIterator[Piece]:
        """One prompt's text as it is generated; the last piece carries the finish reason and counts.
        Checked before the first piece, so a bad request fails as a whole."""
        model = _generator(served)
        if len(request.prompts) != 1:
            raise InvalidInput(
                f"a stream generates one prompt; got {len(request.prompts)} (send them on separate streams)"
            )
        params = model.spec.parse_params(request.params)
        async with self._request(model, call, 1) as state:
            [stream] = await model.open(request.prompts, params, state)
            tokens = 0
            try:
                if stream.prefix:
                    yield Piece(stream.prefix, 0)
                async for piece in model.pieces(stream, state):
                    tokens += piece.tokens
                    if piece.finish_reason is None:
                        yield Piece(piece.text, piece.tokens)
                    else:
                        yield Piece(
                            piece.text, piece.tokens, piece.finish_reason, stream.prompt_tokens, tokens,
                            stream.truncated,
                        )  # fmt: skip
            finally:
                stream.cancel()  # a caller gone before the first piece was asked for frees its row too

    async def _tokens(self, model: ServedModel, tensors: dict[str, np.ndarray], state: RequestState) -> Any:
        sequences, rows, width = read_token_rows(model, tensors)
        items = await model.run_tokens(sequences, state, self.executor)
        return pad_outputs(model, items, rows, width)

    def count(self, call: Call, code: str) -> None:
        """Requests by model, API and status; a name that is not served counts as one label, so a
        client cannot grow the metrics without bound."""
        label = call.model if self.repository.knows(call.model) else "(unknown)"
        self.metrics.requests.labels(model=label, api=call.api, code=code).inc()


def _requested(outputs: dict[str, np.ndarray], requested: list[str]) -> dict[str, np.ndarray]:
    if not requested:
        return outputs
    unknown = [name for name in requested if name not in outputs]
    if unknown:
        raise InvalidInput(f"unknown output {unknown[0]!r}; this model gives {', '.join(outputs)}")
    return {name: outputs[name] for name in requested}


def _generator(model: Served) -> Generative:
    if not model.spec.generative:
        raise InvalidInput(f"model {model.name!r} is a {model.manifest.task} model, not a generator")
    return model
