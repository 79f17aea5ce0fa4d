"""The per-row quantiser of kiln's int8 graphs as one op, ai.kiln.RowQuantize2, with its definition.

    xs       = x * unsmooth                        (RowQuantizeSmoothed2 only: the smoothing factors)
    peak     = ReduceMax(Abs(xs), axis -1)         (second output: the row's scale, times 127)
    q        = QuantizeLinear(xs * (127 / peak), 1, 128)

The graph carries the op and, as a model-local ONNX function, exactly those standard ops. Where
kiln's kernels library is loaded (kiln.runtime.native) onnxruntime runs the op as one kernel;
anywhere else it inlines the function, so a package loads everywhere and gives the same bits either
way (the C kernel does the same IEEE operations in the same order; the export checks the two forms
against each other on the calibration items, and the tests on text).

Packages made before 2026-12-05 carry the first definition, ai.kiln.RowQuantize (and
RowQuantizeSmoothed): QuantizeLinear(xs / peak, 1/127, 128), two divisions a value, which were most
of the kernel's time (perf: 9% of an int8 MiniLM run, one thread). The second divides once a row and
multiplies each value: the same codes but at rare rounding ties. The library keeps both kernels, so
old packages keep their bits; `functions(opset, definition=1)` writes the first, for the tests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from kiln.runtime.native import DOMAIN, ROW_QUANTIZE, ROW_QUANTIZE2, ROW_QUANTIZE_SMOOTHED, ROW_QUANTIZE_SMOOTHED2

if TYPE_CHECKING:
    from onnx import FunctionProto, NodeProto

LEVELS = 127  # levels a side; zero point 128
PER_LEVEL = np.float32(1 / LEVELS)  # the first definition's QuantizeLinear scale (the C kernel's constant, same bits)
ZERO_POINT = np.uint8(LEVELS + 1)
OPS = {1: (ROW_QUANTIZE, ROW_QUANTIZE_SMOOTHED), 2: (ROW_QUANTIZE2, ROW_QUANTIZE_SMOOTHED2)}  # definition -> ops
DEFINITION = 2  # what new packages carry


def quantize_node(
    activation: str, unsmooth: str | None, q: str, peak: str, name: str, definition: int = DEFINITION
) -> NodeProto:
    """The op on `activation` (times `unsmooth` where given), giving `q` (uint8) and `peak`."""
    from onnx import helper

    plain, smoothed = OPS[definition]
    op, inputs = (plain, [activation]) if unsmooth is None else (smoothed, [activation, unsmooth])
    return helper.make_node(op, inputs, [q, peak], name=name, domain=DOMAIN)


def functions(opset: int, definition: int = DEFINITION) -> list[FunctionProto]:
    """Both forms' definitions in standard ops, for a graph of this ONNX opset."""
    plain, smoothed = OPS[definition]
    return [_function(plain, opset, False, definition), _function(smoothed, opset, True, definition)]


def _function(op: str, opset: int, smoothed: bool, definition: int) -> FunctionProto:
    from onnx import helper, numpy_helper

    def constant(name: str, value: np.generic | np.ndarray) -> NodeProto:
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name))

    x = "x"
    nodes = [constant("zero_point", ZERO_POINT)]
    if smoothed:
        nodes.append(helper.make_node("Mul", ["x", "unsmooth"], ["xs"]))
        x = "xs"
    if opset >= 18:  # ReduceMax takes its axes as an input from opset 18
        nodes += [constant("last_axis", np.array([-1], dtype=np.int64))]
        reduce_max = helper.make_node("ReduceMax", ["abs", "last_axis"], ["peak"], keepdims=1)
    else:
        reduce_max = helper.make_node("ReduceMax", ["abs"], ["peak"], axes=[-1], keepdims=1)
    nodes += [helper.make_node("Abs", [x], ["abs"]), reduce_max]
    if definition == 1:  # in [-1, 1]; an all-zero row's 0 / 0 is NaN, code 0
        nodes += [
            constant("per_level", PER_LEVEL),
            helper.make_node("Div", [x, "peak"], ["unit"]),
            helper.make_node("QuantizeLinear", ["unit", "per_level", "zero_point"], ["q"]),
        ]
    else:  # in [-127, 127]; an all-zero row's 0 * inf is NaN, code 0
        nodes += [
            constant("levels", np.float32(LEVELS)),
            constant("one", np.float32(1)),
            helper.make_node("Div", ["levels", "peak"], ["per_peak"]),
            helper.make_node("Mul", [x, "per_peak"], ["levelled"]),
            helper.make_node("QuantizeLinear", ["levelled", "one", "zero_point"], ["q"]),
        ]
    inputs = ["x", "unsmooth"] if smoothed else ["x"]
    return helper.make_function(DOMAIN, op, inputs, ["q", "peak"], nodes, [helper.make_opsetid("", opset)])
