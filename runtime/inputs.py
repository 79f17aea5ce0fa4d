"""Validation of caller text, shared by every pipeline and the server."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

from kiln.runtime.errors import InvalidInput, InvalidInputType

MAX_CHARS = 50_000
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
