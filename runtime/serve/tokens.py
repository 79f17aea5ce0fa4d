"""Pre-tokenized requests: INT64 token ids straight into the graph, for clients that tokenize
themselves; every row is checked before it can join a batch, so a bad row fails its own request only."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from kiln.runtime.errors import InvalidInput
from kiln.runtime.pipelines.base import Outputs


class TokenRow:
    """A pre-tokenized row, shaped like a tokenizers Encoding for the batcher."""

    def __init__(self, ids: np.ndarray, type_ids: np.ndarray):
        self.ids, self.type_ids = ids, type_ids


def read_token_rows(model: Any, tensors: dict[str, np.ndarray]) -> tuple[list[TokenRow], int, int]:
    """The rows of a token-id request (each cut to its attention mask), its row count and width."""
    if "input_ids" not in tensors:
        raise InvalidInput("missing input 'input_ids' (token ids need it; or send text)")
    ids = _int_matrix(tensors, "input_ids")
    rows, width = ids.shape
    if rows == 0 or width == 0:
        raise InvalidInput("input_ids is empty")
    mask = _int_matrix(tensors, "attention_mask") if "attention_mask" in tensors else np.ones_like(ids)
    types = _int_matrix(tensors, "token_type_ids") if "token_type_ids" in tensors else np.zeros_like(ids)
    for name, other in (("attention_mask", mask), ("token_type_ids", types)):
        if other.shape != ids.shape:
            raise InvalidInput(f"input {name!r} has shape {list(other.shape)}, input_ids has {list(ids.shape)}")
    limit = model.manifest.max_sequence_length
    if width > limit:
        raise InvalidInput(f"input_ids has {width} tokens; the model takes at most {limit}")
    _check_range("input_ids", ids, vocabulary_size(model))
    _check_range("token_type_ids", types, type_vocabulary_size(model))
    if not np.isin(mask, (0, 1)).all():
        raise InvalidInput("attention_mask must hold only 0 and 1")
    lengths = np.maximum(mask.sum(axis=1), 1)
    return [TokenRow(ids[i, : lengths[i]], types[i, : lengths[i]]) for i in range(rows)], rows, width


def pad_outputs(model: Any, items: Outputs, rows: int, width: int) -> dict[str, np.ndarray]:
    """The graph's raw outputs per row, padded back to the request's width."""
    outputs = {}
    for name in model.manifest.outputs:
        parts = [item[name] for item in items]
        if name in model.pipeline.sequence_outputs:
            padded = np.zeros((rows, width, *parts[0].shape[1:]), dtype=np.float32)
            for i, part in enumerate(parts):
                padded[i, : len(part)] = part
            outputs[name] = padded
        else:
            outputs[name] = np.stack(parts).astype(np.float32)
    return outputs


def vocabulary_size(model: Any) -> int:
    return model.package.encoder.tokenizer.get_vocab_size(with_added_tokens=True)


def type_vocabulary_size(model: Any) -> int:
    """Token type ids the model's embedding table has (1 where the graph takes none)."""
    if "token_type_ids" not in model.manifest.inputs:
        return 1
    config = model.path / "config.json"
    if config.is_file():
        size = json.loads(config.read_text(encoding="utf-8")).get("type_vocab_size")
        if isinstance(size, int) and size > 0:
            return size
    return 2


def _check_range(name: str, values: np.ndarray, size: int) -> None:
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= size:
        raise InvalidInput(f"{name} must be in [0, {size}) for this model; got values from {low} to {high}")


def _int_matrix(tensors: dict[str, np.ndarray], name: str) -> np.ndarray:
    array = tensors[name]
    if array.dtype not in (np.int64, np.int32):
        raise InvalidInput(f"input {name!r} must be INT64 or INT32, got {array.dtype}")
    if array.ndim != 2:
        raise InvalidInput(f"input {name!r} must have shape [N, L], got {list(array.shape)}")
    return array.astype(np.int64)
