"""What a task is, declared once: its inputs and parameters (typed, validated once), how it calls
its pipeline, and what its answers are. Nothing of a protocol and nothing of the export lives here:
each protocol's codec is beside its adapter (kiln.runtime.serve.kserve_codec, .typed_codec,
.openai_codec) and the export's per-task knowledge (head, gate) is in kiln.export.task_exports, each
keyed by task and checked at import to cover every task.

Adding a task: its module here and its line in the registry, its pipeline, one entry per protocol
codec and one export entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from kiln.runtime.errors import InvalidInput
from kiln.runtime.inputs import typed
from kiln.runtime.pipelines.base import Pipeline, Prepared

Texts = dict[str, list[str]]  # input name -> its texts (KServe BYTES tensors, typed repeated fields)
Params = dict[str, Any]  # parameter name -> its checked value
# parameters a KServe / Triton client may send that are about transport, not the task: accepted, unused
TRANSPORT_PARAMETERS = frozenset(
    {
        "priority",
        "timeout",
        "sequence_id",
        "sequence_start",
        "sequence_end",
        "binary_data",
        "binary_data_output",
        "binary_data_size",
        "triton_enable_empty_final_response",
        "headers",
    }
)


@dataclass(frozen=True)
class Tensor:
    """A KServe input or output. Shape entries: -1 (any), a number, or a size the served model
    knows ("labels": its label count, "hidden": its embedding width)."""

    name: str
    datatype: str
    shape: tuple[int | str, ...]
    optional: bool = False
    per_row: bool = True  # one value per item (text, context); False: one list for the request (labels)

    def resolved_shape(self, sizes: Mapping[str, int]) -> list[int]:
        return [dim if isinstance(dim, int) else sizes.get(dim, -1) for dim in self.shape]


@dataclass(frozen=True)
class Param:
    """A request parameter: its type is checked, never guessed (the string "false" is not a boolean)."""

    name: str
    kind: type
    default: Any = None
    choices: tuple[str, ...] | None = None
    minimum: int | None = None
    special: tuple[int, str] | None = None  # a value below the minimum that means something: (-1, "all")
    help: str = ""

    def parse(self, value: Any) -> Any:
        if value is None:
            return self.default
        checked = typed(value, self.kind, f"parameter {self.name!r}")
        if self.kind is list and isinstance(checked, str):  # a comma-separated string, as a URL or CLI gives it
            checked = [part.strip() for part in checked.split(",") if part.strip()]
        if self.choices is not None and checked not in self.choices:
            raise InvalidInput(f"parameter {self.name!r} must be one of {', '.join(self.choices)}, got {checked!r}")
        if self.minimum is not None and checked < self.minimum and (self.special is None or checked != self.special[0]):
            also = f" (or {self.special[0]} for {self.special[1]})" if self.special else ""
            raise InvalidInput(f"parameter {self.name!r} must be at least {self.minimum}{also}, got {checked}")
        return checked


@dataclass(frozen=True)
class TaskSpec:
    task: str
    pipeline: type[Pipeline]
    inputs: tuple[Tensor, ...]
    parameters: tuple[Param, ...]
    prepare: Callable[[Pipeline, Texts, Params], Prepared]  # answers come out of Prepared.finish
    labels: bool = False  # its answers name the head's labels (kiln.json `labels`, one per output column)
    generative: bool = False  # runs through the decoding loop (kiln.runtime.generation), not the batcher

    @property
    def rows_input(self) -> str:
        """The input whose length is the number of items a request carries."""
        return self.inputs[0].name

    def parse_params(self, raw: Mapping[str, Any]) -> Params:
        known = {p.name: p for p in self.parameters}
        unknown = sorted(set(raw) - set(known) - TRANSPORT_PARAMETERS)
        if unknown:
            accepted = ", ".join(known) or "none"
            raise InvalidInput(f"unknown parameter {unknown[0]!r} for {self.task}; accepted: {accepted}")
        return {name: param.parse(raw.get(name)) for name, param in known.items()}

    def read_texts(self, tensors: Mapping[str, np.ndarray]) -> Texts:
        """The task's text inputs out of decoded BYTES tensors, checked by name and shape."""
        names = {t.name for t in self.inputs}
        extra = sorted(set(tensors) - names)
        if extra:
            raise InvalidInput(
                f"unknown input {extra[0]!r}; a {self.task} model takes {', '.join(sorted(names))} "
                "(or pre-tokenized input_ids)"
            )
        texts: Texts = {}
        for tensor in self.inputs:
            if tensor.name in tensors:
                texts[tensor.name] = utf8_strings(tensors[tensor.name], tensor.name)
            elif not tensor.optional:
                raise InvalidInput(f"missing input {tensor.name!r}")
        return texts


def utf8_strings(array: np.ndarray, name: str) -> list[str]:
    """A BYTES tensor of shape [N] (or [N, 1]) as a list of strings."""
    if array.dtype != object:
        raise InvalidInput(f"input {name!r} must be BYTES (UTF-8 text), got {array.dtype}")
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise InvalidInput(f"input {name!r} must have shape [N], got {list(array.shape)}")
    decoded = []
    for index, value in enumerate(array):
        if isinstance(value, str):
            decoded.append(value)
            continue
        try:
            decoded.append(bytes(value).decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise InvalidInput(
                f"input {name!r}[{index}] is not valid UTF-8 ({_why_not_utf8(bytes(value), exc)})"
            ) from exc
    return decoded


def _why_not_utf8(value: bytes, error: UnicodeDecodeError) -> str:
    """A lone surrogate (JSON's "\\ud800") named as one; other bad bytes by where they are."""
    try:
        text = value.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return f"{error.reason} at byte {error.start}"
    index = next(i for i, char in enumerate(text) if "\ud800" <= char <= "\udfff")
    return f"a lone surrogate U+{ord(text[index]):04X} at character {index}"
