"""int8 MatMuls whose answers cannot depend on batch-mates: one scale per row, exact integer sums.

Each MatMul with a constant weight becomes

    s   = max|x| over the row / 63                 (one scale per token, computed at run time)
    q   = uint8(x / s + 64.5)                      (round half up, zero point 64: q - 64 in [-63, 63])
    y   = MatMulIntegerToFloat(q, W8, 1, w_scale, 64) * s

with W8 the weight in symmetric int8, one scale per output column. A row's scale is its own, the
integer products are summed in int32 (exact, so the kernel's tiling and summation order cannot
change them) and the two scales are applied elementwise: a token's output is the same bits alone,
in any batch, padded or not. Per-tensor dynamic int8 (onnxruntime's, optimum's) shares one scale
across the batch, and MatMulNBits' int8 compute (per-row scales per block of K, block partials summed
in float) was measured drifting with the number of rows in the call; both make an answer depend on
what else was in the call.

Activations use 63 levels a side, not 127: x86 kernels without VNNI multiply u8 by s8 in pairs
summed into int16 (vpmaddubsw), which saturates above 32767; 127 * 127 * 2 = 32258 never does, so the
int32 sums are exact, and the same, on AVX2, AVX-512, VNNI and ARM alike. Inputs that several
MatMuls read (Q, K and V) are quantised once.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from onnx import GraphProto, NodeProto, TensorProto

LEVELS = 63  # activation levels a side (see the module docstring)
WEIGHT_LEVELS = 127
MIN_K = 16  # narrower MatMuls gain nothing from int8


def constant_matmuls(graph: GraphProto) -> dict[str, tuple[int, int]]:
    """MatMul nodes whose second input is a 2-D initializer, with its shape [K, N]."""
    shapes = {init.name: tuple(init.dims) for init in graph.initializer}
    return {
        node.name: shapes[node.input[1]]
        for node in graph.node
        if node.op_type == "MatMul" and node.name and len(shapes.get(node.input[1], ())) == 2
    }


def quantize_rows(model_path: Path, out_path: Path, keep_float: set[str]) -> tuple[list[str], list[str]]:
    """Rewrite every constant-weight MatMul not in keep_float (and at least MIN_K deep); returns
    the names of the MatMuls now in int8 and of those left in float."""
    import onnx

    model = onnx.load(str(model_path))
    graph = model.graph
    weighted = constant_matmuls(graph)
    chosen = {name for name, (k, _) in weighted.items() if k >= MIN_K} - keep_float
    readers: dict[str, list[NodeProto]] = defaultdict(list)
    for node in graph.node:
        if node.name in chosen:
            readers[node.input[0]].append(node)
    weights = {init.name: init for init in graph.initializer}
    before: dict[str, list[NodeProto]] = defaultdict(list)  # new nodes, keyed by the MatMul they go in front of
    for index, (activation, matmuls) in enumerate(readers.items()):
        prefix = f"kiln_rows_{index}"
        before[matmuls[0].name] += _quantize_activation(graph, activation, prefix)
        for matmul in matmuls:
            before[matmul.name] += _integer_matmul(graph, matmul, weights[matmul.input[1]], prefix)
    nodes = [
        new
        for node in graph.node
        for new in (*before[node.name], node)
        if not (new.op_type == "MatMul" and new.name in chosen)
    ]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(out_path))
    return sorted(chosen), sorted(set(weighted) - chosen)


def _quantize_activation(graph: GraphProto, activation: str, prefix: str) -> list[NodeProto]:
    """Nodes that turn the float activation into `{prefix}.q` (uint8) and its row scale `{prefix}.scale`."""
    from onnx import TensorProto, helper

    _constants(
        graph,
        {
            f"{prefix}.tiny": np.float32(1e-12),  # an all-zero row quantises to zeros, not NaN
            f"{prefix}.levels": np.float32(LEVELS),
            f"{prefix}.per_level": np.float32(1 / LEVELS),
            f"{prefix}.offset": np.float32(LEVELS + 1.5),  # zero point 64, and + 0.5 to round
            f"{prefix}.zero_point": np.uint8(LEVELS + 1),
            f"{prefix}.one": np.float32(1.0),
        },
    )
    made = [
        ("Abs", [activation], "abs", {}),
        ("ReduceMax", [f"{prefix}.abs"], "peak_raw", {"axes": [-1], "keepdims": 1}),
        ("Add", [f"{prefix}.peak_raw", f"{prefix}.tiny"], "peak", {}),
        ("Div", [f"{prefix}.levels", f"{prefix}.peak"], "inverse", {}),
        ("Mul", [f"{prefix}.peak", f"{prefix}.per_level"], "scale", {}),
        ("Mul", [activation, f"{prefix}.inverse"], "scaled", {}),
        ("Add", [f"{prefix}.scaled", f"{prefix}.offset"], "shifted", {}),
        ("Cast", [f"{prefix}.shifted"], "q", {"to": TensorProto.UINT8}),  # truncates: the + 0.5 rounds
    ]
    return [
        helper.make_node(op, inputs, [f"{prefix}.{out}"], name=f"{prefix}.{out}", **attrs)
        for op, inputs, out, attrs in made
    ]


def _integer_matmul(graph: GraphProto, matmul: NodeProto, weight: TensorProto, prefix: str) -> list[NodeProto]:
    """MatMulIntegerToFloat on the quantised activation, then the row scale, into the MatMul's output."""
    from onnx import helper, numpy_helper

    w = numpy_helper.to_array(weight).astype(np.float32)
    column_scale = (np.maximum(np.abs(w).max(axis=0), 1e-12) / WEIGHT_LEVELS).astype(np.float32)
    w8 = np.clip(np.round(w / column_scale), -WEIGHT_LEVELS, WEIGHT_LEVELS).astype(np.int8)
    name = f"{matmul.name}.int8"
    _constants(graph, {f"{name}.weight": w8, f"{name}.weight_scale": column_scale})
    return [
        helper.make_node(
            "MatMulIntegerToFloat",
            [f"{prefix}.q", f"{name}.weight", f"{prefix}.one", f"{name}.weight_scale", f"{prefix}.zero_point"],
            [f"{name}.columns_scaled"],
            name=f"{name}.matmul",
            domain="com.microsoft",
        ),
        helper.make_node(
            "Mul", [f"{name}.columns_scaled", f"{prefix}.scale"], [matmul.output[0]], name=f"{name}.rows_scaled"
        ),
    ]


def _constants(graph: GraphProto, values: dict[str, np.generic | np.ndarray]) -> None:
    from onnx import numpy_helper

    graph.initializer.extend(numpy_helper.from_array(np.asarray(value), name) for name, value in values.items())
