"""Activation smoothing (as in SmoothQuant): move activation outliers into the weights.

A few hidden channels of a transformer carry values far larger than the rest, so one int8 scale
per tensor rounds everything else coarsely. For each group of MatMuls that read the same
activation X, a per-channel factor s = max|X_j|^a / max|W_j|^(1-a) is measured on calibration text;
X is divided by s (one Mul, shared by the group) and the weight rows multiplied by it. The product
is unchanged in exact arithmetic; the activation becomes much easier to quantise.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

ALPHA = 0.5


def smooth(
    model_path: Path, out_path: Path, nodes: set[str], feeds: list[dict[str, np.ndarray]], alpha: float = ALPHA
) -> int:
    """Smooth the inputs of the given MatMul nodes; return how many activations were smoothed."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(model_path))
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    groups: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        if node.name in nodes:
            groups[node.input[0]].append(node)
    peaks = _activation_peaks(model_path, list(groups), feeds)
    for tensor, members in groups.items():
        arrays = [numpy_helper.to_array(weights[n.input[1]]) for n in members]
        weight_peak = np.max([np.abs(w).max(axis=1) for w in arrays], axis=0)
        scale = np.maximum(peaks[tensor], 1e-5) ** alpha / np.maximum(weight_peak, 1e-5) ** (1 - alpha)
        scale = np.clip(scale, 1e-3, 1e3).astype(np.float32)
        inverse = numpy_helper.from_array((1.0 / scale).astype(np.float32), f"{tensor}.smooth_inverse")
        graph.initializer.append(inverse)
        mul = helper.make_node("Mul", [tensor, inverse.name], [f"{tensor}.smoothed"], name=f"{tensor}.smooth")
        graph.node.insert(min(list(graph.node).index(n) for n in members), mul)
        for node, array in zip(members, arrays, strict=True):
            node.input[0] = mul.output[0]
            weights[node.input[1]].CopyFrom(numpy_helper.from_array(array * scale[:, None], node.input[1]))
    onnx.save(model, str(out_path))
    return len(groups)


def _activation_peaks(model_path: Path, tensors: list[str], feeds: list[dict[str, np.ndarray]]) -> dict:
    """Per-channel max |value| of each tensor over the calibration feeds."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    probe = onnx.load(str(model_path))
    for name in tensors:
        probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    peaks: dict[str, np.ndarray] = {}
    for feed in feeds:
        for name, value in zip(tensors, session.run(tensors, feed), strict=True):
            channel_max = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
            peaks[name] = np.maximum(peaks[name], channel_max) if name in peaks else channel_max
    return peaks
