"""Activations bounded below (GELU's, ReLU's outputs) quantised on one side: shifted by the bound
onto [0, peak], all 255 codes, zero point 0 (ai.kiln.RowQuantizeShifted2, kiln.export.row_quantize).

Symmetric per-row int8 spends half its codes on negative values; a GELU's output never goes below
-0.17, so that half is nearly empty and the positive values get 127 levels. The shift is a
per-channel constant, so what it adds to the GEMM's output is a per-column constant, taken back out
of the bias the graph adds after the MatMul (`fold_into_bias`), or by an Add where there is none.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from onnx import GraphProto, NodeProto, TensorProto

# -bound <= output on any input, by op type. GELU's minimum is -0.16997 (at -0.7518; its tanh form's too).
LOWER_BOUNDS = {"Gelu": 0.17, "BiasGelu": 0.17, "FastGelu": 0.17, "Relu": 0.0}


def lower_bound(producer: NodeProto | None) -> float | None:
    """The bound of the op that made an activation, or None where it has none kiln knows."""
    return None if producer is None else LOWER_BOUNDS.get(producer.op_type)


def shift_back(w8: np.ndarray, column_scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """What the shift adds to each output column, negated: -(shift @ W), with W the int8 weight
    as the GEMM reads it (levels times column scales), so that adding it gives x @ W."""
    weight = w8.astype(np.float64) * column_scale.astype(np.float64)
    return -(shift.astype(np.float64) @ weight)


def fold_into_bias(
    graph: GraphProto, output: str, back: np.ndarray, reads: dict[str, int], constants: dict[str, TensorProto]
) -> bool:
    """Add `back` to the constant bias vector that the MatMul output's one reader adds (the fp32
    graph's bias Add), so taking the shift back costs nothing a text; False where there is none."""
    from onnx import numpy_helper

    if reads.get(output) != 1:
        return False
    for node in graph.node:
        if node.op_type != "Add" or output not in node.input:
            continue
        other = node.input[1] if node.input[0] == output else node.input[0]
        bias = constants.get(other)
        if bias is None or tuple(bias.dims) != back.shape:
            return False
        name = f"{other}.shifted_back:{output}"
        corrected = numpy_helper.to_array(bias).astype(np.float64) + back
        graph.initializer.append(numpy_helper.from_array(corrected.astype(np.float32), name))
        node.input[:] = [name if value == other else value for value in node.input]
        return True
    return False
