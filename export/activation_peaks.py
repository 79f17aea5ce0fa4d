"""How large each channel of an int8 MatMul's input gets on calibration text: the peaks that
channel smoothing (kiln.export.rowwise_int8.smoothing_factors) divides out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from kiln.export.rowwise_int8 import eligible_matmuls, readers_by_input


def activation_peaks(model_path: Path, feeds: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Per activation that a constant MatMul reads, the largest |value| of each channel over every
    token of `feeds` (each one text, unpadded, so padding cannot set a peak)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(model_path))
    names = sorted(readers_by_input(model.graph, eligible_matmuls(model.graph)))
    outputs = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in outputs)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    peaks: dict[str, np.ndarray] = {}
    for feed in feeds:
        for name, value in zip(names, session.run(names, feed), strict=True):
            peak = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
            peaks[name] = np.maximum(peaks[name], peak) if name in peaks else peak
    return peaks
