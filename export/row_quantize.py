"""The per-row quantiser of kiln's int8 graphs as one op, ai.kiln.RowQuantize2, with its definition.

    xs       = x * unsmooth                        (RowQuantizeSmoothed2 only: the smoothing factors)
    peak     = ReduceMax(Abs(xs), axis -1)         (second output: the row's scale, times 127)
    q        = QuantizeLinear(xs * (127 / peak), 1, 128)

and, for an activation that a function bounds from below (GELU's outputs, kiln.export.one_sided),
ai.kiln.RowQuantizeShifted2: shifted by the bound onto [0, peak], all 255 codes on one side, twice
the resolution of 127 a side:

    xs       = x * unsmooth + shift                (shift = bound * unsmooth, per channel)
    peak     = ReduceMax(Abs(xs), axis -1)         (the row's scale, times 255)
    q        = QuantizeLinear(xs * (255 / peak), 1, 0)

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
from kiln.runtime.native import (
    DOMAIN,
    ROW_QUANTIZE,
    ROW_QUANTIZE2,
    ROW_QUANTIZE_SHIFTED2,
    ROW_QUANTIZE_SMOOTHED,
    ROW_QUANTIZE_SMOOTHED2,
)

if TYPE_CHECKING:
    from onnx import FunctionProto, NodeProto

LEVELS = 127  # levels a side; zero point 128
PER_LEVEL = np.float32(1 / LEVELS)  # the first definition's QuantizeLinear scale (the C kernel's constant, same bits)
ZERO_POINT = np.uint8(LEVELS + 1)
ONE_SIDED_LEVELS = 255  # the shifted form's levels, all on one side: zero point 0
ONE_SIDED_ZERO_POINT = np.uint8(0)
OPS = {1: (ROW_QUANTIZE, ROW_QUANTIZE_SMOOTHED), 2: (ROW_QUANTIZE2, ROW_QUANTIZE_SMOOTHED2)}  # definition -> ops
DEFINITION = 2  # what new packages carry


def quantize_node(
    activation: str,
    unsmooth: str | None,
    q: str,
    peak: str,
    name: str,
    definition: int = DEFINITION,
    shift: str | None = None,
) -> NodeProto:
    """The op on `activation` (times `unsmooth` where given, plus `shift` where given: the one-sided
    form, which needs both), giving `q` (uint8) and `peak`."""
    from onnx import helper

    plain, smoothed = OPS[definition]
    if shift is not None:
        if unsmooth is None:
            raise ValueError("the one-sided quantiser takes the smoothing factors (ones where none)")
        op, inputs = ROW_QUANTIZE_SHIFTED2, [activation, unsmooth, shift]
    else:
        op, inputs = (plain, [activation]) if unsmooth is None else (smoothed, [activation, unsmooth])
    return helper.make_node(op, inputs, [q, peak], name=name, domain=DOMAIN)


def functions(opset: int, definition: int = DEFINITION) -> list[FunctionProto]:
    """The forms' definitions in standard ops, for a graph of this ONNX opset (the one-sided form
    with the second definition only)."""
    plain, smoothed = OPS[definition]
    made = [_function(plain, opset, "plain", definition), _function(smoothed, opset, "smoothed", definition)]
    if definition == 2:
        made.append(_function(ROW_QUANTIZE_SHIFTED2, opset, "shifted", definition))
    return made


def _function(op: str, opset: int, form: str, definition: int) -> FunctionProto:
    from onnx import helper, numpy_helper

    def constant(name: str, value: np.generic | np.ndarray) -> NodeProto:
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name))

    x = "x"
    one_sided = form == "shifted"
    nodes = [constant("zero_point", ONE_SIDED_ZERO_POINT if one_sided else ZERO_POINT)]
    if form != "plain":
        nodes.append(helper.make_node("Mul", ["x", "unsmooth"], ["xs"]))
        x = "xs"
    if one_sided:
        nodes.append(helper.make_node("Add", ["xs", "shift"], ["xsh"]))
        x = "xsh"
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
    else:  # in [-127, 127] (one-sided: [0, 255]); an all-zero row's 0 * inf is NaN, the lowest code
        nodes += [
            constant("levels", np.float32(ONE_SIDED_LEVELS if one_sided else LEVELS)),
            constant("one", np.float32(1)),
            helper.make_node("Div", ["levels", "peak"], ["per_peak"]),
            helper.make_node("Mul", [x, "per_peak"], ["levelled"]),
            helper.make_node("QuantizeLinear", ["levelled", "one", "zero_point"], ["q"]),
        ]
    inputs = {"plain": ["x"], "smoothed": ["x", "unsmooth"], "shifted": ["x", "unsmooth", "shift"]}[form]
    return helper.make_function(DOMAIN, op, inputs, ["q", "peak"], nodes, [helper.make_opsetid("", opset)])
