"""Chat messages to a prompt, rendered as `transformers`' `apply_chat_template` renders them.

The template is the model's own (`chat_template.jinja` in the package, else `chat_template` in
tokenizer_config.json) or, for a model that carries none, one the server is given (`kiln serve
--chat-template FILE`). It is
rendered in Jinja2's immutable sandbox with transformers' environment (trim_blocks, lstrip_blocks,
loop controls, its `tojson`, `raise_exception`, `strftime_now`) and the tokenizer's special tokens as
variables, so the text, and its tokens (encoded without adding special tokens, as
`apply_chat_template(tokenize=True)` does), are the ones transformers gives.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from kiln.runtime.errors import InvalidInput, PackageError
from kiln.runtime.package import read_json

ROLES = ("system", "developer", "user", "assistant", "tool")
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@dataclass(frozen=True)
class ChatTemplate:
    source: str  # the Jinja template text
    where: str  # where it came from, for messages
    tokens: Mapping[str, Any]  # the tokenizer's special tokens, as the template sees them
    compiled: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "compiled", _compile(self.source, self.where))

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        import jinja2

        try:
            return self.compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.tokens)
        except jinja2.TemplateError as exc:  # the template's own raise_exception, or a template error
            raise InvalidInput(f"the chat template ({self.where}) refused the messages: {exc}") from exc


def load_chat_template(directory: Path, fallback: Path | None = None) -> ChatTemplate | None:
    """The package's chat template, else `fallback`'s (`kiln serve --chat-template`, for models that
    carry none); None when there is neither."""
    config = read_json(directory / "tokenizer_config.json")
    tokens = _special_tokens(read_json(directory / "special_tokens_map.json"), config)
    file = directory / "chat_template.jinja"
    if file.is_file():
        return ChatTemplate(file.read_text(encoding="utf-8"), file.name, tokens)
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the "default" one answers chat
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if isinstance(template, str):
        return ChatTemplate(template, "tokenizer_config.json", tokens)
    if fallback is None:
        return None
    try:
        return ChatTemplate(fallback.read_text(encoding="utf-8"), str(fallback), tokens)
    except OSError as exc:
        raise PackageError(f"cannot read the chat template {fallback}: {exc.strerror or exc}") from exc


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI chat messages as templates take them: a role and text content (a string, or text
    parts joined); anything else is refused naming the message."""
    if not isinstance(messages, list) or not messages:
        raise InvalidInput("'messages' must be a non-empty list of {role, content} objects")
    checked = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise InvalidInput(f"{where} must be an object with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise InvalidInput(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}")
        checked.append({**message, "content": _text(message.get("content"), f"{where}.content")})
    return checked


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidInput(f"{where}: only text parts ({{'type': 'text', 'text': ...}}) are taken")
            parts.append(part["text"])
        return "".join(parts)
    raise InvalidInput(f"{where} is missing: every message needs text content")


def _special_tokens(special: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    tokens: dict[str, Any] = {}
    for name in SPECIAL_TOKENS:
        value = special.get(name, config.get(name))
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            tokens[name] = value
    extra = special.get("additional_special_tokens")
    if isinstance(extra, list):
        tokens["additional_special_tokens"] = [t.get("content") if isinstance(t, dict) else t for t in extra]
    return tokens


def _compile(source: str, where: str) -> Any:
    """transformers' Jinja environment (`_compile_jinja_template`), without its assistant-mask tracker."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:  # fmt: skip
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return environment.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise PackageError(f"the chat template ({where}) does not parse: {exc}") from exc
