"""text-generation, text2text-generation, summarization, translation: prompts in, text out.

One spec per task, all built here: they share their inputs (Triton's generate convention:
`text_input` and the sampling parameters by name) and their pipeline's way of running (the decoding
loop); their codecs (one per protocol) and their export entries (head, optimum's graph, the greedy
gate) are shared too, keyed by task.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from kiln.runtime.errors import InvalidInput
from kiln.runtime.generation.settings import ALIASES, REQUEST_FIELDS
from kiln.runtime.inputs import parse_json
from kiln.runtime.pipelines.text_generation import (
    GenerationPipeline,
    SummarizationPipeline,
    TextGenerationPipeline,
    TranslationPipeline,
)
from kiln.runtime.tasks.spec import Param, Params, TaskSpec, Tensor, utf8_strings

_HELP = {
    "max_new_tokens": "default: the model's generation config, else 256",
    "do_sample": "default: true for text-generation (temperature 0.7), else false",
    "num_beams": "default: 4 for seq2seq tasks, as transformers' pipelines",
    "seed": "sampling is reproducible with a seed",
    "stop": "stop strings (not included in the answer)",
}
PARAMETERS = (
    *(Param(name, kind, help=_HELP.get(name, "")) for name, kind in REQUEST_FIELDS.items()),
    *(Param(alias, REQUEST_FIELDS[name], help=f"alias of {name}") for alias, name in ALIASES.items()),
    Param("truncate", bool, False, help="cut an over-long prompt (false: refuse it)"),
    Param("return_full_text", bool, None, help="text-generation: the prompt before the new text"),
    Param(
        "add_special_tokens",
        bool,
        True,
        help="tokenize the prompt with the tokenizer's special tokens (false: as given)",
    ),
)
# what the pipeline call takes besides the generation settings
PIPELINE_PARAMETERS = ("truncate", "return_full_text", "add_special_tokens")


# Triton's generate convention (its vLLM and TensorRT-LLM backends): besides `text_input`, the
# request may carry these as input tensors; `sampling_parameters` is a JSON object of parameters
CONTROL_INPUTS = ("max_tokens", "stream", "sampling_parameters", "exclude_input_in_output")


@dataclass
class GenerateRequest:
    """A generation request read off the wire: prompts, raw parameters, and whether to stream."""

    prompts: list[str]
    params: dict[str, Any]
    stream: bool = False


def read_request(tensors: Mapping[str, np.ndarray], parameters: Mapping[str, Any]) -> GenerateRequest:
    """`text_input` and Triton's control inputs (tensors), with KServe request parameters beside
    them; a parameter named twice is refused rather than silently chosen."""
    known = {"text_input", *CONTROL_INPUTS}
    extra = sorted(set(tensors) - known)
    if extra:
        raise InvalidInput(f"unknown input {extra[0]!r}; a generator takes text_input, {', '.join(CONTROL_INPUTS)}")
    if "text_input" not in tensors:
        raise InvalidInput("missing input 'text_input'")
    params = dict(parameters)
    stream = bool(params.pop("stream", False))
    given: dict[str, Any] = {}
    if "sampling_parameters" in tensors:
        given.update(_json_object(utf8_strings(tensors["sampling_parameters"].reshape(-1), "sampling_parameters")[0]))
    if "max_tokens" in tensors:
        given["max_tokens"] = _scalar(tensors["max_tokens"], "max_tokens", int)
    if "exclude_input_in_output" in tensors:
        given["return_full_text"] = not _scalar(tensors["exclude_input_in_output"], "exclude_input_in_output", bool)
    if "stream" in tensors:
        stream = _scalar(tensors["stream"], "stream", bool)
    twice = sorted(set(given) & set(params))
    if twice:
        raise InvalidInput(f"parameter {twice[0]!r} given both as an input and as a request parameter")
    return GenerateRequest(utf8_strings(tensors["text_input"].reshape(-1), "text_input"), {**params, **given}, stream)


def _json_object(text: str) -> dict[str, Any]:
    value = parse_json(text, "input 'sampling_parameters'")
    if not isinstance(value, dict):
        raise InvalidInput("input 'sampling_parameters' must be a JSON object of parameters")
    return value


def _scalar(array: np.ndarray, name: str, kind: type) -> Any:
    if array.size != 1:
        raise InvalidInput(f"input {name!r} must hold one value, got shape {list(array.shape)}")
    value = array.reshape(-1)[0]
    if kind is bool:
        if array.dtype != np.bool_:
            raise InvalidInput(f"input {name!r} must be BOOL, got {array.dtype}")
        return bool(value)
    if not np.issubdtype(array.dtype, np.integer):
        raise InvalidInput(f"input {name!r} must be an integer (INT32 or INT64), got {array.dtype}")
    return int(value)


def settings_of(params: Params) -> dict[str, Any]:
    """The generation settings a request set (the rest are the model's defaults)."""
    return {k: v for k, v in params.items() if v is not None and k not in PIPELINE_PARAMETERS}


def _not_a_pipeline_call(*args: Any) -> Any:
    raise InvalidInput("generation runs through the decoding loop, not the encoder batcher")


def _spec(task: str, pipeline: type[GenerationPipeline]) -> TaskSpec:
    return TaskSpec(
        task=task,
        pipeline=pipeline,  # type: ignore[arg-type]  # generation pipelines run sequences, not encodings
        inputs=(
            Tensor("text_input", "BYTES", (-1,)),
            Tensor("max_tokens", "INT32", (1,), optional=True, per_row=False),
            Tensor("stream", "BOOL", (1,), optional=True, per_row=False),
            Tensor("sampling_parameters", "BYTES", (1,), optional=True, per_row=False),
            Tensor("exclude_input_in_output", "BOOL", (1,), optional=True, per_row=False),
        ),
        parameters=PARAMETERS,
        prepare=_not_a_pipeline_call,
        generative=True,
    )


TEXT_GENERATION = _spec("text-generation", TextGenerationPipeline)
TEXT2TEXT = _spec("text2text-generation", GenerationPipeline)
SUMMARIZATION = _spec("summarization", SummarizationPipeline)
TRANSLATION = _spec("translation", TranslationPipeline)
SPECS = (TEXT_GENERATION, TEXT2TEXT, SUMMARIZATION, TRANSLATION)
