"""The per-row quantiser of kiln's int8 graphs as one op, ai.kiln.RowQuantize, with its definition.

    xs   = x * unsmooth                        (RowQuantizeSmoothed only: the smoothing factors)
    peak = ReduceMax(Abs(xs), axis -1)         (second output: the row's scale, times 127)
    q    = QuantizeLinear(xs / peak, 1/127, 128)

The graph carries the op and, as a model-local ONNX function, exactly those standard ops. Where
kiln's kernels library is loaded (kiln.runtime.native) onnxruntime runs the op as one kernel;
anywhere else it inlines the function, so a package loads everywhere and gives the same bits either
way (the C kernel does the same IEEE operations in the same order; the export checks the two forms
against each other on the calibration items, and the tests on text).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from kiln.runtime.native import DOMAIN, ROW_QUANTIZE, ROW_QUANTIZE_SMOOTHED

if TYPE_CHECKING:
    from onnx import FunctionProto, NodeProto

LEVELS = 127  # levels a side; zero point 128
PER_LEVEL = np.float32(1 / LEVELS)  # QuantizeLinear's scale: x / peak * 127 (the C kernel's constant, same bits)
ZERO_POINT = np.uint8(LEVELS + 1)


def quantize_node(activation: str, unsmooth: str | None, q: str, peak: str, name: str) -> NodeProto:
    """The op on `activation` (times `unsmooth` where given), giving `q` (uint8) and `peak`."""
    from onnx import helper

    op, inputs = (ROW_QUANTIZE, [activation]) if unsmooth is None else (ROW_QUANTIZE_SMOOTHED, [activation, unsmooth])
    return helper.make_node(op, inputs, [q, peak], name=name, domain=DOMAIN)


def functions(opset: int) -> list[FunctionProto]:
    """Both forms' definitions in standard ops, for a graph of this ONNX opset."""
    return [_function(ROW_QUANTIZE, opset, smoothed=False), _function(ROW_QUANTIZE_SMOOTHED, opset, smoothed=True)]


def _function(op: str, opset: int, smoothed: bool) -> FunctionProto:
    from onnx import helper, numpy_helper

    def constant(name: str, value: np.generic | np.ndarray) -> NodeProto:
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name))

    x = "x"
    nodes = [constant("per_level", PER_LEVEL), constant("zero_point", ZERO_POINT)]
    if smoothed:
        nodes.append(helper.make_node("Mul", ["x", "unsmooth"], ["xs"]))
        x = "xs"
    if opset >= 18:  # ReduceMax takes its axes as an input from opset 18
        nodes += [constant("last_axis", np.array([-1], dtype=np.int64))]
        reduce_max = helper.make_node("ReduceMax", ["abs", "last_axis"], ["peak"], keepdims=1)
    else:
        reduce_max = helper.make_node("ReduceMax", ["abs"], ["peak"], axes=[-1], keepdims=1)
    nodes += [
        helper.make_node("Abs", [x], ["abs"]),
        reduce_max,
        helper.make_node("Div", [x, "peak"], ["unit"]),  # in [-1, 1]; an all-zero row's 0 / 0 is NaN, code 0
        helper.make_node("QuantizeLinear", ["unit", "per_level", "zero_point"], ["q"]),
    ]
    inputs = ["x", "unsmooth"] if smoothed else ["x"]
    return helper.make_function(DOMAIN, op, inputs, ["q", "peak"], nodes, [helper.make_opsetid("", opset)])
