"""Validation of caller text, shared by every pipeline and the server."""

from __future__ import annotations

import json
import math
import unicodedata
from collections.abc import Sequence
from typing import Any

from kiln.runtime.errors import InvalidInput, InvalidInputType

MAX_CHARS = 50_000
MAX_JSON_DEPTH = 32  # arrays and objects inside each other; KServe tensors need their rank, parameters 2-3
MAX_JSON_INTEGER_DIGITS = 20  # 64-bit integers; longer ones would cost Python quadratic time to parse
_ALLOWED_CONTROLS = {"\t", "\n", "\r"}


def check_text(text: object, what: str = "text") -> str:
    """Return text if a tokenizer can take it, else raise an error that names the problem."""
    if not isinstance(text, str):
        raise InvalidInputType(f"{what} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise InvalidInput(f"{what} is empty")
    if len(text) > MAX_CHARS:
        raise InvalidInput(f"{what} is {len(text)} characters long; the limit is {MAX_CHARS}")
    for index, char in enumerate(text):
        if "\ud800" <= char <= "\udfff":
            raise InvalidInput(f"{what} contains a lone surrogate (U+{ord(char):04X}) at index {index}")
        if char not in _ALLOWED_CONTROLS and unicodedata.category(char) == "Cc":
            raise InvalidInput(f"{what} contains control character U+{ord(char):04X} at index {index}")
    return text


def check_texts(texts: object, what: str = "text") -> list[str]:
    """Accept one string or a non-empty sequence of strings; always return a list."""
    if isinstance(texts, str):
        return [check_text(texts, what)]
    if not isinstance(texts, Sequence) or isinstance(texts, bytes | bytearray):
        raise InvalidInputType(f"{what} must be a string or a list of strings, got {type(texts).__name__}")
    if len(texts) == 0:
        raise InvalidInput(f"{what}: empty list")
    return [check_text(t, f"{what}[{i}]") for i, t in enumerate(texts)]


def check_pairs(texts: list[str], pairs: object, what: str = "text_pair") -> list[str]:
    checked = check_texts(pairs, what)
    if len(checked) != len(texts):
        raise InvalidInput(f"{len(texts)} texts but {len(checked)} {what} values; they must pair one to one")
    return checked


def finite_float(what: str, value: int | float) -> float:
    """A request's number as a float, refusing what no float holds (a 400-digit integer, inf, nan)."""
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise InvalidInput(f"{what} must be a finite number, got {value!r}")
    return number


_EXPECTED = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list of strings (or one string)",
}


def typed(value: Any, kind: type, what: str) -> Any:
    """A request parameter checked against its declared type, never coerced (the string "false" is
    not a boolean, True is not an integer): the one rule every protocol's parameters go through.
    `list` means strings, one or a list, returned as given; a float comes back finite."""
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
        list: isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)),
    }[kind]
    if not ok:
        raise InvalidInput(f"{what} must be {_EXPECTED[kind]}, got {type(value).__name__} {value!r}")
    return finite_float(what, value) if kind is float else value


def parse_json(raw: bytes | str, what: str) -> Any:
    """A request's JSON, refusing what would break later steps with a message that names the limit:
    nesting deeper than MAX_JSON_DEPTH, integers beyond 64 bits, and the non-JSON NaN and Infinity
    that Python's parser would otherwise accept."""
    try:
        value = json.loads(raw, parse_constant=_not_json, parse_int=_integer)
    except RecursionError as exc:
        raise InvalidInput(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{what} is not valid JSON: {exc}") from exc
    if _deeper_than(value, MAX_JSON_DEPTH):
        raise InvalidInput(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def _not_json(constant: str) -> Any:
    raise InvalidInput(f"{constant} is not a JSON number (give a finite number)")


def _integer(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_JSON_INTEGER_DIGITS or not -(2**63) <= (value := int(digits)) < 2**64:
        raise InvalidInput(f"integer {digits[:24]}{'...' if len(digits) > 24 else ''} does not fit in 64 bits")
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether containers nest past `limit`, level by level (no recursion to exhaust)."""
    level = [value] if isinstance(value, list | dict) else []
    for _ in range(limit):
        level = [
            item
            for container in level
            for item in (container.values() if isinstance(container, dict) else container)
            if isinstance(item, list | dict)
        ]
        if not level:
            return False
    return bool(level)
