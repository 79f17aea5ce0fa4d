"""How a text is generated: the model's generation_config.json, overridden per request.

Defaults and meanings follow `transformers` `GenerationConfig`, so a request means what it would
mean to `model.generate` (top_k 50 when sampling, max_length counting the prompt for decoder-only
models, forced eos on the last step for BART) and greedy answers are token-identical.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from kiln.runtime.errors import InvalidInput
from kiln.runtime.inputs import typed

# request names accepted besides the transformers ones (Triton's and OpenAI's spellings)
ALIASES = {
    "max_tokens": "max_new_tokens",
    "min_tokens": "min_new_tokens",
    "stop_strings": "stop",
    "random_seed": "seed",
}


@dataclass(frozen=True)
class Settings:
    max_new_tokens: int | None = None  # None: from max_length
    max_length: int = 20  # transformers' default: prompt + new tokens (decoder-only), decoder tokens (seq2seq)
    min_new_tokens: int = 0
    min_length: int = 0  # as max_length counts; from the model's config only
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    seed: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    stop: tuple[str, ...] = ()
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    decoder_start_token_id: int | None = None
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = None
    bad_token_ids: tuple[int, ...] = ()  # single-token bad_words_ids (Marian bans its pad token)
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def new_tokens(self, prompt_length: int, decoder_only: bool) -> int:
        """How many tokens may be generated for a prompt of this length."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        used = prompt_length if decoder_only else 1  # seq2seq counts the decoder start token
        return max(self.max_length - used, 0)


# what a request may set, with its type; the rest comes from the model's generation config
REQUEST_FIELDS: dict[str, type] = {
    "max_new_tokens": int,
    "min_new_tokens": int,
    "do_sample": bool,
    "temperature": float,
    "top_k": int,
    "top_p": float,
    "seed": int,
    "num_beams": int,
    "length_penalty": float,
    "early_stopping": bool,
    "repetition_penalty": float,
    "no_repeat_ngram_size": int,
    "stop": list,
}


# the transformers pipelines' own defaults (4.5x `_default_generation_config`), under the model's
# generation config: kiln answers as `pipeline(task)` answers, in process and over the wire
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "text-generation": {"max_new_tokens": 256, "do_sample": True, "temperature": 0.7},
    "text2text-generation": {"max_new_tokens": 256, "num_beams": 4},
    "summarization": {"max_new_tokens": 256, "num_beams": 4},
    "translation": {"max_new_tokens": 256, "num_beams": 4},
}
_GLOBAL = Settings()


def from_generation_config(directory: Path, config: Mapping[str, Any], task: str) -> Settings:
    """The task's defaults, overridden by what the model's generation_config.json (else the
    generation fields of config.json) sets to other than transformers' global defaults."""
    path = directory / "generation_config.json"
    source = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else dict(config)
    eos = source.get("eos_token_id", config.get("eos_token_id"))
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    bad = tuple(ids[0] for ids in source.get("bad_words_ids") or [] if len(ids) == 1)
    known = {f.name for f in fields(Settings)} - {"eos_token_ids", "bad_token_ids", "stop", "extra"}
    model = {k: source[k] for k in known if source.get(k) is not None and source[k] != getattr(_GLOBAL, k)}
    pipeline = TASK_DEFAULTS.get(task, {})
    specific = {k: v for k, v in task_parameters(config, task).items() if k in known}
    values = {**pipeline, **model, **specific}
    if "max_length" in model and "max_new_tokens" not in model:
        values.pop("max_new_tokens", None)  # as the pipelines do: a model's own max_length wins over 256 new tokens
    pad = source.get("pad_token_id", config.get("pad_token_id"))
    start = source.get("decoder_start_token_id", config.get("decoder_start_token_id"))
    values.update(eos_token_ids=eos_ids, bad_token_ids=bad, pad_token_id=pad, decoder_start_token_id=start)
    return Settings(**values)


def task_parameters(config: Mapping[str, Any], task: str) -> dict[str, Any]:
    """The legacy `task_specific_params` the transformers pipeline applies for a task (t5's
    "summarize: " prefix and beam settings; "translation" takes the first translation_XX_to_YY)."""
    params = config.get("task_specific_params") or {}
    key = task if task in params else next((k for k in params if task == "translation" and k.startswith(task)), None)
    return dict(params.get(key) or {})


def prompt_prefix(config: Mapping[str, Any], task: str) -> str:
    """Text the pipeline puts before every input (the task's prefix, else the model's)."""
    return str(task_parameters(config, task).get("prefix") or config.get("prefix") or "")


def with_request(defaults: Settings, request: Mapping[str, Any], max_positions: int) -> Settings:
    """The model's defaults overridden by a request's parameters, each checked by name."""
    values: dict[str, Any] = {}
    for raw_name, value in request.items():
        name = ALIASES.get(raw_name, raw_name)
        if name not in REQUEST_FIELDS:
            accepted = ", ".join([*REQUEST_FIELDS, *ALIASES])
            raise InvalidInput(f"unknown generation parameter {raw_name!r}; accepted: {accepted}")
        if value is not None:
            checked = typed(value, REQUEST_FIELDS[name], f"parameter {raw_name!r}")
            values[name] = [checked] if isinstance(checked, str) else checked  # one stop string
    if "stop" in values:
        values["stop"] = tuple(values["stop"])
    if values.get("num_beams", 1) > 1 and "do_sample" not in values:
        values["do_sample"] = False  # beams asked for, sampling only the task's default: beam search
    if values.get("temperature") == 0:  # OpenAI's and vLLM's greedy; transformers would refuse it
        values.update(temperature=1.0, do_sample=False)
    elif values.get("do_sample") is None and any(k in values for k in ("temperature", "top_p", "seed")):
        values.setdefault("do_sample", True)  # asking for a temperature means sampling, as OpenAI's API does
    settings = replace(defaults, **values)
    check(settings, max_positions)
    return settings


# Bounds every request is held to, so that no value a request may send can break a decoding step
# (docs/generation.md, "Generation parameters: ranges"): floats must be finite; a temperature or a penalty of
# any finite positive size is safe, since sampling works relative to the best score in float64.
MAX_BEAMS = 16
MAX_LENGTH_PENALTY = 10.0  # beam scores divide by length ** length_penalty: 4096 ** 10 is still finite
MAX_STOP_STRINGS = 16  # each token's text is checked against every stop string
MAX_STOP_CHARS = 128


def check(settings: Settings, max_positions: int) -> None:
    """Refuse settings that cannot be honoured, naming the parameter and its range."""
    for name in ("temperature", "top_p", "length_penalty", "repetition_penalty"):
        if not math.isfinite(getattr(settings, name)):
            raise InvalidInput(f"parameter {name!r} must be a finite number, got {getattr(settings, name)!r}")
    limits = [
        ("max_new_tokens", settings.max_new_tokens is None or 1 <= settings.max_new_tokens <= max_positions),
        ("min_new_tokens", 0 <= settings.min_new_tokens <= max_positions),
        ("temperature", settings.temperature > 0),
        ("top_k", settings.top_k >= 0),
        ("top_p", 0 < settings.top_p <= 1),
        ("num_beams", 1 <= settings.num_beams <= MAX_BEAMS),
        ("length_penalty", abs(settings.length_penalty) <= MAX_LENGTH_PENALTY),
        ("repetition_penalty", settings.repetition_penalty > 0),
        ("no_repeat_ngram_size", settings.no_repeat_ngram_size >= 0),
        ("seed", settings.seed is None or 0 <= settings.seed < 2**63),
    ]
    for name, ok in limits:
        if not ok:
            raise InvalidInput(
                f"parameter {name!r} is out of range: {getattr(settings, name)!r}{_range(name, max_positions)}"
            )
    if settings.max_new_tokens is not None and settings.min_new_tokens > settings.max_new_tokens:
        raise InvalidInput(
            f"parameter 'min_new_tokens' ({settings.min_new_tokens}) is more than 'max_new_tokens' "
            f"({settings.max_new_tokens})"
        )
    if settings.num_beams > 1 and settings.do_sample:
        raise InvalidInput("parameter 'num_beams' > 1 with do_sample is not supported (beam sampling); choose one")
    if len(settings.stop) > MAX_STOP_STRINGS:
        raise InvalidInput(f"parameter 'stop' has {len(settings.stop)} strings; the limit is {MAX_STOP_STRINGS}")
    if any(not s for s in settings.stop):
        raise InvalidInput("parameter 'stop' has an empty string")
    if any(len(s) > MAX_STOP_CHARS for s in settings.stop):
        raise InvalidInput(f"parameter 'stop' has a string over {MAX_STOP_CHARS} characters")


def _range(name: str, max_positions: int) -> str:
    ranges = {
        "max_new_tokens": f" (1 to {max_positions})",
        "min_new_tokens": f" (0 to {max_positions})",
        "temperature": " (must be > 0; use do_sample=false for greedy)",
        "top_k": " (must be >= 0; 0 keeps every token)",
        "top_p": " (0 < top_p <= 1)",
        "num_beams": f" (1 to {MAX_BEAMS})",
        "length_penalty": f" (-{MAX_LENGTH_PENALTY:g} to {MAX_LENGTH_PENALTY:g})",
        "repetition_penalty": " (must be > 0)",
        "no_repeat_ngram_size": " (must be >= 0)",
        "seed": " (0 to 2**63 - 1)",
    }
    return ranges.get(name, "")
