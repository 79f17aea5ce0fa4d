"""OpenAI bodies to kiln's requests and kiln's answers to OpenAI's objects: completions, chat
completions (and their stream chunks), embeddings, model cards, errors.

What a field means, as vLLM and TGI serve it:
- `max_tokens` (chat also `max_completion_tokens`): new tokens; unset, completions take OpenAI's 16
  and chat the model's own default. Other unset fields take the model's generation config and the
  transformers pipeline's defaults, as kiln's other protocols do, so one prompt gets one answer on
  every protocol.
- `temperature` 0 is greedy; `top_p`, `stop`, `seed` as OpenAI's; `n` choices per prompt (1 to 16;
  more than 1 needs sampling, as vLLM refuses n > 1 with greedy decoding); with a `seed`, choice j
  samples with seed + j, so the n choices differ and each is reproducible.
- `presence_penalty` and `frequency_penalty` are additive penalties that the runtime does not have:
  0 is accepted, anything else is refused naming the field (`repetition_penalty`, transformers'
  multiplicative one, is taken as an extension field, as are `top_k`, `min_tokens` and
  `no_repeat_ngram_size`). `logprobs`, `logit_bias`, `best_of` > 1, `suffix` and tools are refused
  when set. Any other unknown field is refused by name.
- Completions on a seq2seq package (summarization, translation, text2text): the prompt is the source
  text and the completion its generated target; `echo` is refused there. Chat needs a chat template
  (the package's, or for a package without one `kiln serve --chat-template FILE`).
"""

from __future__ import annotations

import base64
import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from kiln.runtime.errors import InputTooLong, InvalidInput, KilnError, ModelNotServed, QueueFull
from kiln.runtime.generation.chat import check_messages
from kiln.runtime.generation.decoding import Piece
from kiln.runtime.inputs import typed

MAX_CHOICES = 16
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
EXTENSIONS = {"top_k": "top_k", "repetition_penalty": "repetition_penalty", "min_tokens": "min_new_tokens",
              "no_repeat_ngram_size": "no_repeat_ngram_size"}  # fmt: skip
COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
          "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "user", *EXTENSIONS}  # fmt: skip
COMPLETION_FIELDS = COMMON | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                        "parallel_tool_calls", "response_format"}  # fmt: skip
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 408: "timeout_error", 413: "invalid_request_error", 429: "rate_limit_error",
               503: "service_unavailable_error", 504: "timeout_error"}  # fmt: skip
KILN_TO_OPENAI = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}


class OpenAiInvalid(InvalidInput):
    """A request field OpenAI's clients send that kiln refuses; `param` names it in the error body."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class Asked:
    """A completion or chat request read off its body: prompts as text, kiln's parameters."""

    chat: bool
    prompts: list[str]
    params: dict[str, Any]
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    echo: bool = False


@dataclass
class Copy:
    """One call to the data plane: its prompts and parameters, and the choice index of each answer."""

    prompts: list[str]
    params: dict[str, Any]
    indices: list[int]


# ---- reading -------------------------------------------------------------------------------------


def read_completion(body: dict[str, Any], model: Any) -> Asked:
    _known(body, COMPLETION_FIELDS, "/v1/completions")
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise OpenAiInvalid("'prompt' must be a string or a non-empty list of strings (token ids are not taken)",
                            "prompt")  # fmt: skip
    echo = _typed(body, "echo", bool) or False
    if echo and not model.generator.decoder_only:
        raise OpenAiInvalid("'echo' needs a decoder-only model; a seq2seq model's prompt is its source text", "echo")
    if _typed(body, "best_of", int) not in (None, 1):
        raise OpenAiInvalid("'best_of' is not supported (use n)", "best_of")
    if _typed(body, "suffix", str):
        raise OpenAiInvalid("'suffix' (insertion) is not supported", "suffix")
    if body.get("logprobs") not in (None, 0):
        raise OpenAiInvalid("'logprobs' is not supported", "logprobs")
    max_tokens = _typed(body, "max_tokens", int)
    asked = _common(body, False, prompts, COMPLETIONS_MAX_TOKENS if max_tokens is None else max_tokens)
    return _checked(replace(asked, echo=echo), model)


def read_chat(body: dict[str, Any], model: Any) -> Asked:
    _known(body, CHAT_FIELDS, "/v1/chat/completions")
    try:
        messages = check_messages(body.get("messages"))
    except InvalidInput as exc:
        raise OpenAiInvalid(str(exc), "messages") from exc
    template = model.generator.chat_template
    if template is None:
        raise OpenAiInvalid(
            f"model {model.name!r} has no chat template (its tokenizer config carries none); use /v1/completions, "
            "or start kiln serve with --chat-template FILE",
            "messages",
        )
    max_tokens, max_completion = _typed(body, "max_tokens", int), _typed(body, "max_completion_tokens", int)
    if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
        raise OpenAiInvalid("'max_tokens' and 'max_completion_tokens' disagree; send one", "max_completion_tokens")
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") not in (None, 0):
        raise OpenAiInvalid("'logprobs' is not supported", "logprobs")
    for name in ("tools", "tool_choice", "parallel_tool_calls"):
        if body.get(name) not in (None, [], "none"):
            raise OpenAiInvalid(f"'{name}' is not supported (no tool calling)", name)
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise OpenAiInvalid("'response_format' other than text is not supported", "response_format")
    try:
        prompt = template.render(messages)
    except InvalidInput as exc:
        raise OpenAiInvalid(str(exc), "messages") from exc
    asked = _common(body, True, [prompt], max_completion or max_tokens)
    asked.params["add_special_tokens"] = False  # the template wrote them, as apply_chat_template(tokenize=True)
    return _checked(asked, model)


def read_embeddings(body: dict[str, Any]) -> tuple[str, list[str], str, int | None]:
    name, texts = body.get("model"), body.get("input")
    if not isinstance(name, str) or not name:
        raise OpenAiInvalid("'model' must name a served feature-extraction model", "model")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise OpenAiInvalid("'input' must be a string or a non-empty list of strings (token arrays are not taken)",
                            "input")  # fmt: skip
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise OpenAiInvalid(f"'encoding_format' must be float or base64, got {encoding!r}", "encoding_format")
    return name, texts, encoding, body.get("dimensions")


def _common(body: dict[str, Any], chat: bool, prompts: list[str], max_tokens: int | None) -> Asked:
    params: dict[str, Any] = {"return_full_text": False}  # the echo is the adapter's, not the pipeline's
    if max_tokens is not None:
        params["max_new_tokens"] = max_tokens
    for field_name in ("temperature", "top_p"):
        if (value := _typed(body, field_name, float)) is not None:
            params[field_name] = value
    if (temperature := params.get("temperature")) is not None and temperature < 0:
        raise OpenAiInvalid(f"'temperature' must be >= 0, got {temperature}", "temperature")
    for field_name in ("presence_penalty", "frequency_penalty"):
        if _typed(body, field_name, float) not in (None, 0.0):
            raise OpenAiInvalid(f"'{field_name}' is not supported (additive penalties); send 0, or "
                                "repetition_penalty (transformers' multiplicative one)", field_name)  # fmt: skip
    if body.get("logit_bias") not in (None, {}):
        raise OpenAiInvalid("'logit_bias' is not supported", "logit_bias")
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise OpenAiInvalid("'stop' must be a string or a list of strings", "stop")
        params["stop"] = stops
    if (seed := _typed(body, "seed", int)) is not None:
        params["seed"] = seed
    for openai_name, kiln_name in EXTENSIONS.items():
        if body.get(openai_name) is not None:
            params[kiln_name] = body[openai_name]  # typed and ranged by the task's parameters
    n = _typed(body, "n", int)
    if n is not None and not 1 <= n <= MAX_CHOICES:
        raise OpenAiInvalid(f"'n' must be 1 to {MAX_CHOICES}, got {n}", "n")
    stream = _typed(body, "stream", bool) or False
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise OpenAiInvalid("'stream_options' takes {'include_usage': bool}, and only with stream", "stream_options")
    include_usage = bool((options or {}).get("include_usage", False))
    return Asked(chat, prompts, params, n or 1, stream, include_usage)


def _checked(asked: Asked, model: Any) -> Asked:
    """Refuse what the model's settings make impossible, before anything runs (n > 1 of a greedy
    or beam answer: n identical choices)."""
    settings = model.settings_for(asked.params)
    if asked.n > 1 and (not settings.do_sample or settings.num_beams > 1):
        raise OpenAiInvalid("'n' must be 1 with greedy or beam decoding (the choices would be identical); set "
                            "temperature > 0", "n")  # fmt: skip
    return asked


def _known(body: dict[str, Any], fields: set[str], route: str) -> None:
    unknown = sorted(k for k, v in body.items() if k not in fields and v is not None)
    if unknown:
        raise OpenAiInvalid(f"unknown field {unknown[0]!r} for {route}", unknown[0])


def _typed(body: dict[str, Any], name: str, kind: type) -> Any:
    """A body field by the rule every protocol's parameters follow (kiln.runtime.inputs.typed)."""
    value = body.get(name)
    if value is None:
        return None
    try:
        return typed(value, kind, f"'{name}'")
    except InvalidInput as exc:
        raise OpenAiInvalid(str(exc), name) from exc


# ---- running -------------------------------------------------------------------------------------


def copies(asked: Asked) -> list[Copy]:
    """The data plane calls a request makes. Choice p * n + j is prompt p's j-th; with a seed each j is
    its own call (seed + j), else one call holds every prompt n times."""
    count = len(asked.prompts)
    seed = asked.params.get("seed")
    if asked.n == 1 or seed is None:
        prompts = [prompt for prompt in asked.prompts for _ in range(asked.n)]
        return [Copy(prompts, asked.params, list(range(count * asked.n)))]
    return [
        Copy(asked.prompts, {**asked.params, "seed": seed + j}, [p * asked.n + j for p in range(count)])
        for j in range(asked.n)
    ]


def stream_choices(asked: Asked) -> list[tuple[str, dict[str, Any]]]:
    """(prompt, parameters) of every choice, in choice order: each streams on its own."""
    seed = asked.params.get("seed")
    return [
        (prompt, asked.params if seed is None else {**asked.params, "seed": seed + j})
        for prompt in asked.prompts
        for j in range(asked.n)
    ]


# ---- writing -------------------------------------------------------------------------------------


def response_body(asked: Asked, model: str, copies_made: list[Copy], answered: list[Any]) -> dict[str, Any]:
    choices: list[dict[str, Any]] = [{} for _ in range(len(asked.prompts) * asked.n)]
    prompt_tokens: dict[int, int] = {}
    for copy, result in zip(copies_made, answered, strict=True):
        for index, answer in zip(copy.indices, result.answers, strict=True):
            prompt_tokens[index // asked.n] = answer.prompt_tokens
            choices[index] = _choice(asked, index, answer)
    completion = sum(c.pop("_tokens") for c in choices)
    prompt = sum(prompt_tokens.values())
    return {
        "id": response_id(asked.chat),
        "object": "chat.completion" if asked.chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
    }


def _choice(asked: Asked, index: int, answer: Piece) -> dict[str, Any]:
    reason = _finish(answer.finish_reason)
    if asked.chat:
        message = {"role": "assistant", "content": answer.text}
        return {"index": index, "message": message, "logprobs": None, "finish_reason": reason, "_tokens": answer.tokens}
    text = (asked.prompts[index // asked.n] if asked.echo else "") + answer.text
    return {"index": index, "text": text, "logprobs": None, "finish_reason": reason, "_tokens": answer.tokens}


class StreamWriter:
    """One SSE response's events, in OpenAI's chunk format: a chat choice opens with the assistant
    role, pieces follow as they come, each choice ends with its finish reason, and the response with
    the usage (when asked for) and `data: [DONE]`."""

    def __init__(self, asked: Asked, model: str, response_id: str, created: int):
        self.asked = asked
        self.base = {"id": response_id, "object": "chat.completion.chunk" if asked.chat else "text_completion",
                     "created": created, "model": model}  # fmt: skip
        if asked.include_usage:
            self.base["usage"] = None
        self.prompt_tokens: dict[int, int] = {}
        self.completion_tokens = 0

    def opening(self) -> Iterator[bytes]:
        for index in range(len(self.asked.prompts) * self.asked.n):
            if self.asked.chat:
                yield self._event(index, {"role": "assistant", "content": ""}, None)
            elif self.asked.echo:
                yield self._event(index, self.asked.prompts[index // self.asked.n], None)

    def chunk(self, index: int, chunk: Any) -> Iterator[bytes]:
        self.completion_tokens += chunk.tokens
        if chunk.finish_reason is None:
            if chunk.text:
                yield self._event(index, {"content": chunk.text} if self.asked.chat else chunk.text, None)
            return
        self.prompt_tokens[index // self.asked.n] = chunk.prompt_tokens
        reason = _finish(chunk.finish_reason)
        if self.asked.chat:
            if chunk.text:
                yield self._event(index, {"content": chunk.text}, None)
            yield self._event(index, {}, reason)
        else:
            yield self._event(index, chunk.text, reason)

    def closing(self) -> Iterator[bytes]:
        if self.asked.include_usage:
            prompt = sum(self.prompt_tokens.values())
            usage = {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens,
                     "total_tokens": prompt + self.completion_tokens}  # fmt: skip
            yield event({**self.base, "choices": [], "usage": usage})
        yield b"data: [DONE]\n\n"

    def _event(self, index: int, content: Any, reason: str | None) -> bytes:
        key = "delta" if self.asked.chat else "text"
        choice = {"index": index, key: content, "logprobs": None, "finish_reason": reason}
        return event({**self.base, "choices": [choice]})


def response_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode("utf-8") + b"\n\n"


def embeddings_body(model: str, vectors: list[np.ndarray], tokens: int, encoding: str) -> dict[str, Any]:
    data = [{"object": "embedding", "index": i, "embedding": _vector(v, encoding)} for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}  # fmt: skip


def model_card(model: Any) -> dict[str, Any]:
    return {"id": model.name, "object": "model", "created": model.created, "owned_by": "kiln",
            "task": model.manifest.task}  # fmt: skip


def error_body(status: int, message: str, exc: BaseException | None) -> dict[str, Any]:
    """OpenAI's error shape; `param` names the field where kiln's message does."""
    param = getattr(exc, "param", None) or ("prompt" if isinstance(exc, InputTooLong) else _param_in(message))
    code = None
    if isinstance(exc, ModelNotServed):
        code = "model_not_found"
    elif isinstance(exc, QueueFull):
        code = "rate_limit_exceeded"
    elif isinstance(exc, KilnError) and exc.grpc_status == "INTERNAL":
        code = "internal_error"
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _param_in(message: str) -> str | None:
    found = re.match(r"(?:parameter |unknown generation parameter |unknown parameter )?'([a-z_]+)'", message)
    return KILN_TO_OPENAI.get(found.group(1), found.group(1)) if found else None


def _finish(reason: str) -> str:
    return reason if reason in ("stop", "length") else "stop"


def _vector(vector: np.ndarray, encoding: str) -> Any:
    if encoding == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()
