"""Tokenization with the package's tokenizer.json, padding decided here and not by the file.

sentence-transformers saves tokenizer.json with fixed padding to 128; obeying it runs every short
text at full length, so padding from the file is always switched off and batches are padded to
their own longest member.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from kiln.runtime.errors import InputTooLong
from tokenizers import Encoding, Tokenizer


@dataclass
class Batch:
    """Model inputs for a padded batch plus the encodings they came from."""

    feeds: dict[str, np.ndarray]
    attention_mask: np.ndarray
    encodings: list[Encoding]


class TextEncoder:
    """Encodes text (and text pairs) into exactly the inputs the ONNX graph declares."""

    def __init__(
        self, tokenizer: Tokenizer, input_names: list[str], max_length: int, pad_id: int, pad_multiple: int = 1
    ):
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length)
        self.tokenizer = tokenizer
        self.input_names = input_names
        self.max_length = max_length
        self.pad_id = pad_id
        self.pad_multiple = pad_multiple  # GPUs reuse buffers and engines across lengths in one bucket

    @classmethod
    def from_directory(
        cls, directory: Path, input_names: list[str], max_length: int, pad_multiple: int = 1
    ) -> TextEncoder:
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        return cls(tokenizer, input_names, max_length, _pad_id(directory, tokenizer), pad_multiple)

    def tokenize(self, texts: list[str], pairs: list[str] | None = None, truncation: bool = True) -> list[Encoding]:
        items = list(zip(texts, pairs, strict=True)) if pairs is not None else texts
        encodings = self.tokenizer.encode_batch(items)
        if not truncation:
            for index, enc in enumerate(encodings):
                if enc.overflowing:
                    length = len(enc.ids) + sum(len(o.ids) for o in enc.overflowing)
                    raise InputTooLong(
                        f"text[{index}] is about {length} tokens; the model takes at most "
                        f"{self.max_length} (pass truncation=True to cut it)"
                    )
        return encodings

    def pad(self, encodings: list[Encoding]) -> Batch:
        length = max(len(e.ids) for e in encodings)
        length = -(-length // self.pad_multiple) * self.pad_multiple
        shape = (len(encodings), length)
        ids = np.full(shape, self.pad_id, dtype=np.int64)
        mask = np.zeros(shape, dtype=np.int64)
        types = np.zeros(shape, dtype=np.int64)
        for row, enc in enumerate(encodings):
            n = len(enc.ids)
            ids[row, :n] = enc.ids
            mask[row, :n] = 1
            types[row, :n] = enc.type_ids
        available = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return Batch({name: available[name] for name in self.input_names}, mask, encodings)


def _pad_id(directory: Path, tokenizer: Tokenizer) -> int:
    """The pad id from the model's config, then the tokenizer's own pad token, else 0."""
    config_path = directory / "config.json"
    if config_path.is_file():
        pad = json.loads(config_path.read_text(encoding="utf-8")).get("pad_token_id")
        if isinstance(pad, int):
            return pad
    for token in ("[PAD]", "<pad>"):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    return 0
