"""What every task pipeline shares: validated input, length-sorted batches, per-item outputs."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from kiln.runtime.package import Package
from tokenizers import Encoding


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = np.exp(x - x.max(axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class Pipeline:
    """Base of the task pipelines; subclasses turn per-item model outputs into answers."""

    task: str = ""
    # outputs whose second axis is the token sequence, trimmed to each item's own length
    sequence_outputs: tuple[str, ...] = ()

    def __init__(self, package: Package, batch_size: int = 8):
        self.package = package
        self.manifest = package.manifest
        self.encoder = package.encoder
        self.batch_size = batch_size
        self.runner: Callable[[list[Encoding]], list[dict[str, np.ndarray]]] | None = None

    def forward(self, encodings: list[Encoding]) -> list[dict[str, np.ndarray]]:
        """Run encodings through the session, each item's outputs trimmed to its own length,
        in the order given. A server replaces `runner` to merge items of many requests."""
        if self.runner is not None:
            return self.runner(encodings)
        results: list[dict[str, np.ndarray]] = [{} for _ in encodings]
        size = min(self.batch_size, self.manifest.max_batch_size or self.batch_size)
        for chunk in _length_sorted_chunks(encodings, size):
            outputs = self.package.run(self.encoder.pad([encodings[i] for i in chunk]))
            for row, index in enumerate(chunk):
                results[index] = self.item(outputs, row, len(encodings[index].ids))
        return results

    def item(self, outputs: dict[str, np.ndarray], row: int, length: int) -> dict[str, np.ndarray]:
        """One item's outputs from a padded batch; sequence outputs lose their padding."""
        return {
            name: value[row, :length] if name in self.sequence_outputs else value[row]
            for name, value in outputs.items()
        }


def _length_sorted_chunks(encodings: list[Encoding], size: int) -> Iterator[list[int]]:
    order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids))
    for start in range(0, len(order), size):
        yield order[start : start + size]
