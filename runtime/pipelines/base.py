"""What every task pipeline shares: a request prepared (validated, tokenized), a runner that runs
its encodings through the model, and the answers finished from the outputs.

The seam is explicit (as TEI's backend): in process a pipeline runs its own package's session
(`SessionRunner`); the server prepares on a worker thread, runs the encodings through its batcher
with other requests' and finishes on a worker thread again, so no thread waits for a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from kiln.runtime.package import Package
from tokenizers import Encoding

Outputs = list[dict[str, np.ndarray]]  # per encoding, its outputs; sequence outputs trimmed to its length


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = np.exp(x - x.max(axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class Runner(Protocol):
    """Runs encodings through the model; the outputs come back in the order given."""

    def run(self, encodings: list[Encoding]) -> Outputs: ...


@dataclass
class Prepared:
    """A request ready for the model: what to run, and how its outputs become answers."""

    encodings: list[Encoding]
    finish: Callable[[Outputs], Any]


def split_row(outputs: dict[str, np.ndarray], row: int, length: int, sequence_outputs: tuple[str, ...]) -> dict:
    """One item's outputs from a padded batch; sequence outputs lose their padding."""
    return {name: value[row, :length] if name in sequence_outputs else value[row] for name, value in outputs.items()}


class SessionRunner:
    """In process: the package's own session, on length-sorted chunks of at most `batch_size`
    (or the package's own limit: 1 for a graph whose rows are not batch-invariant)."""

    def __init__(self, package: Package, sequence_outputs: tuple[str, ...], batch_size: int = 8):
        self.package = package
        self.sequence_outputs = sequence_outputs
        self.batch_size = min(batch_size, package.manifest.max_batch_size or batch_size)

    def run(self, encodings: list[Encoding]) -> Outputs:
        results: Outputs = [{} for _ in encodings]
        for chunk in _length_sorted_chunks(encodings, self.batch_size):
            outputs = self.package.run(self.package.encoder.pad([encodings[i] for i in chunk]))
            for row, index in enumerate(chunk):
                results[index] = split_row(outputs, row, len(encodings[index].ids), self.sequence_outputs)
        return results


class Pipeline:
    """Base of the task pipelines: `prepare` validates and tokenizes, the runner runs, and the
    prepared request's `finish` turns outputs into answers. Calling the pipeline does all three."""

    task: str = ""
    # outputs whose second axis is the token sequence, trimmed to each item's own length
    sequence_outputs: tuple[str, ...] = ()

    def __init__(self, package: Package, runner: Runner | None = None, batch_size: int = 8):
        self.package = package
        self.manifest = package.manifest
        self.encoder = package.encoder
        self.runner: Runner = runner or SessionRunner(package, self.sequence_outputs, batch_size)

    def prepare(self, *args: Any, **kwargs: Any) -> Prepared:
        raise NotImplementedError

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.run(self.prepare(*args, **kwargs))

    def run(self, prepared: Prepared) -> Any:
        return prepared.finish(self.runner.run(prepared.encodings))


def _length_sorted_chunks(encodings: list[Encoding], size: int) -> Iterator[list[int]]:
    order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids))
    for start in range(0, len(order), size):
        yield order[start : start + size]
