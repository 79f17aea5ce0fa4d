"""Explicit int8 for TensorRT: QuantizeLinear/DequantizeLinear around MatMuls of a standard-ops graph.

TensorRT takes int8 only where the graph says so (explicit quantization): a Q/DQ pair on each
activation input and a DequantizeLinear on each int8 weight. kiln writes them itself, in the form
TensorRT documents: symmetric int8 (zero point 0), activations per tensor (one Q/DQ pair shared by
every MatMul that reads the tensor, as Q, K and V read one), weights per output channel. The
attention products (Q·Kᵀ, softmax·V) are MatMuls too and are quantized on both inputs.

Activation scales come from the largest magnitude each tensor reaches on the calibration text
(MinMax), measured once; any subset of MatMuls can then be written without measuring again, which
is what lets the export keep just the sensitive MatMuls in float (measured: in all-MiniLM-L6-v2
the first layer's FFN output projection alone, quantized, drops the embedding cosine to 0.58: its
input carries one 24.0 value on [CLS] that sets the tensor's scale, while the weight row of that
channel is 40x larger than the others and multiplies every other token's rounding error).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from kiln.export.figures import Fidelity
from kiln.export.quantize import QuantInfo, keep_sensitive_in_float, matmul_groups
from kiln.runtime.errors import ParityError

INT8_MAX = 127


@dataclass
class Calibration:
    """Largest |value| of every MatMul activation input over the calibration feeds."""

    peaks: dict[str, float] = field(default_factory=dict)
    feeds: int = 0


def matmul_inputs(model_path: Path) -> dict[str, list[str]]:
    """Every MatMul node name -> its two input tensor names."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    return {node.name: list(node.input) for node in graph.node if node.op_type == "MatMul"}


def calibrate(model_path: Path, feeds: list[dict[str, np.ndarray]]) -> Calibration:
    import onnx
    import onnxruntime as ort
    from onnx import helper

    model = onnx.load(str(model_path))
    constants = _constants(model.graph)
    tensors = sorted({name for node in model.graph.node if node.op_type == "MatMul" for name in node.input} - constants)
    known = {o.name for o in model.graph.output}
    for name in tensors:
        if name not in known:
            model.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    calibration = Calibration(feeds=len(feeds))
    for feed in feeds:
        for name, value in zip(tensors, session.run(tensors, feed), strict=True):
            calibration.peaks[name] = max(calibration.peaks.get(name, 0.0), float(np.abs(value).max()))
    return calibration


def write_qdq(model_path: Path, out_path: Path, quantize: set[str], calibration: Calibration) -> QdqPlacement:
    """Write the graph with the named MatMuls in int8; returns where Q/DQ went."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(model_path))
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    constants = _constants(graph)
    dequantized: dict[str, str] = {}  # float tensor -> its DequantizeLinear output (shared by readers)
    new_nodes: dict[int, list[onnx.NodeProto]] = defaultdict(list)  # inserted before node index

    def scale_init(name: str, value: np.ndarray) -> str:
        graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    def zero_init(name: str, shape: tuple[int, ...]) -> str:
        graph.initializer.append(numpy_helper.from_array(np.zeros(shape, dtype=np.int8), name))
        return name

    for index, node in enumerate(graph.node):
        if node.op_type != "MatMul" or node.name not in quantize:
            continue
        for slot, tensor in enumerate(node.input):
            if tensor in dequantized:
                node.input[slot] = dequantized[tensor]
            elif tensor in weights and len(weights[tensor].dims) == 2:
                node.input[slot] = dequantized[tensor] = _weight_dq(graph, weights[tensor], new_nodes[index])
            elif tensor not in constants:
                scale = max(calibration.peaks.get(tensor, 0.0), 1e-8) / INT8_MAX
                s, z = scale_init(f"{tensor}.qdq_scale", np.array(scale)), zero_init(f"{tensor}.qdq_zero", ())
                q = helper.make_node("QuantizeLinear", [tensor, s, z], [f"{tensor}.q"], name=f"{tensor}.Q")
                dq = helper.make_node("DequantizeLinear", [q.output[0], s, z], [f"{tensor}.dq"], name=f"{tensor}.DQ")
                new_nodes[index] += [q, dq]
                node.input[slot] = dequantized[tensor] = dq.output[0]
    ordered = []
    for index, node in enumerate(graph.node):
        ordered += [*new_nodes.get(index, []), node]
    del graph.node[:]
    graph.node.extend(ordered)
    _drop_unused_initializers(graph)
    onnx.save(model, str(out_path))
    return qdq_placement(out_path)


def _weight_dq(graph: object, weight: object, into: list) -> str:
    """Replace a float [K, N] weight by int8 with one scale per output column, and a DequantizeLinear."""
    from onnx import helper, numpy_helper

    array = numpy_helper.to_array(weight)
    scale = np.maximum(np.abs(array).max(axis=0), 1e-12) / INT8_MAX
    quantized = np.clip(np.round(array / scale), -INT8_MAX, INT8_MAX).astype(np.int8)
    name = weight.name
    graph.initializer.extend(
        [
            numpy_helper.from_array(quantized, f"{name}.int8"),
            numpy_helper.from_array(scale.astype(np.float32), f"{name}.int8_scale"),
            numpy_helper.from_array(np.zeros(scale.shape, dtype=np.int8), f"{name}.int8_zero"),
        ]
    )
    into.append(
        helper.make_node(
            "DequantizeLinear",
            [f"{name}.int8", f"{name}.int8_scale", f"{name}.int8_zero"],
            [f"{name}.dq"],
            name=f"{name}.DQ",
            axis=1,
        )
    )
    return f"{name}.dq"


def _constants(graph: object) -> set[str]:
    return {init.name for init in graph.initializer} | {
        o for n in graph.node if n.op_type == "Constant" for o in n.output
    }


def _drop_unused_initializers(graph: object) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def quantize_qdq(
    model_path: Path,
    out_path: Path,
    feeds: list[dict[str, np.ndarray]],
    evaluate: Callable[[Path], Fidelity],
    target: float,
) -> QuantInfo:
    """Every encoder MatMul in int8 if that reaches the target; else the sensitive groups (a layer's
    MatMuls that read one tensor: Q/K/V together, each attention product, each projection) back in
    float, most damaging first, until it does. The task head stays in float."""
    calibration = calibrate(model_path, feeds)
    groups = matmul_groups(model_path)
    encoder = {n for group, members in groups.items() if group != "other" for n in members}

    def write(floating: list[str], path: Path) -> None:
        write_qdq(model_path, path, encoder - set(floating), calibration)

    write([], out_path)
    scores = {"all": evaluate(out_path).score}
    trials: list[dict[str, object]] = []
    if scores["all"] < target:
        floating, trials = keep_sensitive_in_float(
            {g: m for g, m in groups.items() if g != "other"}, write, evaluate, target, out_path.with_suffix(".probe")
        )
        write(floating, out_path)
    placement = qdq_placement(out_path)
    if not placement.int8_matmuls:
        raise ParityError(
            f"int8 cannot reach {target:g} on this model with any MatMul group in int8 (all in int8: "
            f"{scores['all']:.4f}); export fp16 (--quantize fp16) or lower --min-agreement",
            {"quantization": {"sensitivity": trials}},
        )
    return QuantInfo(
        scheme=f"explicit int8 Q/DQ on {len(placement.int8_matmuls)} of {placement.matmuls} MatMuls (weights: "
        "symmetric int8 per output channel; activations: symmetric int8 per tensor, MinMax calibration); "
        "the rest in float",
        quantized=len(placement.int8_matmuls),
        kept_float=placement.float_matmuls,
        details={
            "calibration_texts": calibration.feeds,
            "int8_matmuls": placement.int8_matmuls,
            "weight_matmuls": placement.weight_matmuls,
            "quantize_linear": placement.quantize_linear,
            "dequantize_linear": placement.dequantize_linear,
            "score_all_int8": scores["all"],
            "sensitivity": trials,
        },
    )


@dataclass
class QdqPlacement:
    """Where a Q/DQ graph quantizes: which MatMuls read only dequantized inputs, which stay float."""

    matmuls: int
    weight_matmuls: int
    quantize_linear: int
    dequantize_linear: int
    int8_matmuls: list[str]
    float_matmuls: list[str]


def qdq_placement(model_path: Path) -> QdqPlacement:
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    producers = {out: node for node in graph.node for out in node.output}
    matmuls = [node for node in graph.node if node.op_type == "MatMul"]

    def dequantized(name: str) -> bool:
        return name in producers and producers[name].op_type == "DequantizeLinear"

    def from_weight(name: str) -> bool:  # a DequantizeLinear of a constant, or a float constant
        source = producers[name].input[0] if dequantized(name) else name
        return source not in producers or producers[source].op_type == "Constant"

    int8 = [node.name for node in matmuls if all(dequantized(i) for i in node.input)]
    return QdqPlacement(
        matmuls=len(matmuls),
        weight_matmuls=sum(from_weight(node.input[1]) for node in matmuls),
        quantize_linear=sum(node.op_type == "QuantizeLinear" for node in graph.node),
        dequantize_linear=sum(node.op_type == "DequantizeLinear" for node in graph.node),
        int8_matmuls=int8,
        float_matmuls=[node.name for node in matmuls if node.name not in int8],
    )
