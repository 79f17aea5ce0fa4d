"""What calibration text says of each int8 MatMul's input: how large each channel gets (the peaks
that channel smoothing divides out, kiln.export.rowwise_int8.smoothing_factors) and how the
channels vary together (the Gram matrix that error-feedback rounding weighs weight errors by,
kiln.export.error_feedback)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from kiln.export.rowwise_int8 import eligible_matmuls, readers_by_input


@dataclass
class ActivationStats:
    """One activation's channels (its last axis) over every calibration token."""

    peaks: np.ndarray  # the largest |value| of each channel
    gram: np.ndarray  # sum over tokens of x x^T (float64)

    def gram_of(self, factors: np.ndarray | None) -> np.ndarray:
        """The Gram matrix of x / factors: what an int8 GEMM reads, smoothed."""
        return self.gram if factors is None else self.gram / np.outer(factors, factors)


class _Accumulator:
    """Rows gathered and folded into the Gram matrix a few thousand at a time: one large float32
    GEMM instead of one small one per text (8 s of all-MiniLM's 15 s int8 step, done that way)."""

    FOLD_ROWS = 4096

    def __init__(self, width: int):
        self.peaks = np.zeros(width, np.float32)
        self.gram = np.zeros((width, width))
        self.rows: list[np.ndarray] = []
        self.held = 0

    def add(self, rows: np.ndarray) -> None:
        self.peaks = np.maximum(self.peaks, np.abs(rows).max(axis=0))
        self.rows.append(rows.astype(np.float32))
        self.held += len(rows)
        if self.held >= self.FOLD_ROWS:
            self._fold()

    def _fold(self) -> None:
        if self.rows:
            block = np.concatenate(self.rows)
            self.gram += (block.T @ block).astype(np.float64)
            self.rows, self.held = [], 0

    def stats(self) -> ActivationStats:
        self._fold()
        return ActivationStats(self.peaks, self.gram)


def activation_stats(model_path: Path, feeds: list[dict[str, Any]]) -> dict[str, ActivationStats]:
    """Per activation that a constant MatMul reads, its statistics over every token of `feeds` (each
    one text, unpadded, so padding counts for nothing)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(model_path))
    names = sorted(readers_by_input(model.graph, eligible_matmuls(model.graph)))
    outputs = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in outputs)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    gathered: dict[str, _Accumulator] = {}
    for feed in feeds:
        for name, value in zip(names, session.run(names, feed), strict=True):
            rows = value.reshape(-1, value.shape[-1])
            gathered.setdefault(name, _Accumulator(rows.shape[1])).add(rows)
    return {name: accumulator.stats() for name, accumulator in gathered.items()}
