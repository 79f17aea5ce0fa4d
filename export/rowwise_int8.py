"""int8 MatMuls whose answers cannot depend on batch-mates: one scale per row, exact integer sums.

Each MatMul with a constant weight becomes

    p   = max|x| over the row                      (the scale, p / 127, is per token, computed at run time)
    q   = QuantizeLinear(x / p, 1/127, 128)        (round half to even, zero point 128: q - 128 in [-127, 127])
    y   = MatMulIntegerToFloat(q, W8, p, w_scale / 127, 128)  (p: A's scale, one per row)

with W8 the weight in symmetric int8 (63 levels a side; 127 for VNNI CPUs, below), one scale per
output column. A row's scale is its own, the integer products are summed in int32 (exact, so the
kernel's tiling and summation order cannot change them) and the two scales are applied elementwise:
a token's output is the same bits alone, in any batch, padded or not. Per-tensor dynamic int8
(onnxruntime's, optimum's) shares one scale across the batch, and MatMulNBits' int8 compute (per-row
scales per block of K, block partials summed in float) was measured drifting with the number of rows
in the call; both make an answer depend on what else was in the call.

Levels: x86 kernels without VNNI multiply u8 by s8 in pairs summed into int16 (vpmaddubsw), which
saturates above 32767. The kernel sees the activation as stored, 0..255 with its zero point, so a
pair of products stays exact while 255 * w * 2 <= 32767: weights get 63 levels a side (255 * 63 * 2
= 32130) and activations all 127, and the int32 sums are exact, and the same, on AVX2, AVX-512, VNNI
and ARM alike. Where the package need only run on CPUs that sum in int32 (`kiln export --int8-cpus
vnni`: AVX-512 VNNI, AVX-VNNI, AMX, ARM dot products), weights keep 127 levels, and the runtime
refuses such a package on a CPU without them (kiln.runtime.cpu). The activation's levels are the
ones that count: on all-MiniLM-L6-v2 with every MatMul in int8 (342 corpus sentences, pooled cosine
against fp32), 63 activation x 127 weight levels gave min 0.9729 / mean 0.9887, 127 x 63 gave
0.9808 / 0.9920 at the same speed (127 x 127 0.9880 / 0.9949; u8 x u8, exact at 127 x 127
everywhere, was 1.3x slower). Inputs that several MatMuls read (Q, K and V) are quantised once, and
their weights packed side by side into one int8 GEMM whose output is split: the same int32 sums and
scales per column, so the same bits, in one call instead of three.

Each step is one onnxruntime kernel, and on a text at a time the kernels' fixed cost, not their
passes over memory, is what the quantiser costs (measured on all-MiniLM-L6-v2, alternating rounds,
one text a call: replacing the scale computation with a constant saves 11% of the run, dropping the
row-scale Mul another 8%). So the form is the fewest standard kernels: Abs and ReduceMax for the
peak, a Div by the peak and QuantizeLinear's own scale-round-and-saturate (per-tensor scale 1/127,
zero point 128) for q, the 1/127 folded into the weight's column scales for the way back: four
kernels, where the first form used eight (its Mul by 1/127, Add of 0.5 and Cast now inside
QuantizeLinear and the weight scales). An all-zero row has a peak of 0: its x / 0 is NaN, which
QuantizeLinear turns into some code, and its outputs are still exact zeros, as they are multiplied
by the peak. (An Add of 1e-30 to the peak guarded this until 2026-12-04; dropping it gave the same
bits on every corpus sentence, alone and in padded batches.)
QuantizeLinear with a per-row scale (blocked, opset 21) would save the Div, but it gives uint8 only
with a zero-point tensor of the scale's run-time shape, and int8 activations run onnxruntime's
generic s8 x s8 GEMM on x86 (10x slower, measured).
Since 2026-12-05 those kernels (and the smoothing Mul) are one op, ai.kiln.RowQuantize, defined in
the graph as a function of exactly them (kiln.export.row_quantize): kiln's kernels library runs it
as one kernel (kiln.runtime.native), and without the library onnxruntime inlines the function, so
the same bits either way. And MatMulIntegerToFloat takes the row peaks as its A scale (a scale of
shape [..., rows, 1] multiplies each output row after the column scales, onnxruntime >= 1.20): the
multiply the row-scale Mul did, inside the GEMM's kernel, the same bits.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from kiln.export import one_sided, row_quantize, self_attention, skip_layer_norm
from kiln.export.graph_edges import producers, read_counts
from kiln.export.int8_switch import SWITCH, switch, with_branches
from kiln.export.row_quantize import LEVELS, ONE_SIDED_LEVELS, ONE_SIDED_ZERO_POINT, ZERO_POINT, quantize_node
from kiln.runtime.cpu import INT8_CPUS
from kiln.runtime.errors import UnsupportedModel
from kiln.runtime.native import DOMAIN

if TYPE_CHECKING:
    from kiln.export.activation_stats import ActivationStats
    from onnx import GraphProto, NodeProto

WEIGHT_LEVELS = INT8_CPUS["any"]  # 63, so that 255 * 63 * 2 fits int16: exact on every x86 kernel
MIN_K = 16  # narrower MatMuls gain nothing from int8
SMOOTHING_ALPHA = 0.5  # how much of a channel's outlier moves into the weight (see smoothing_factors)
UNEVEN = 3.0  # channels are smoothed where the largest peak is over this many times the median


def constant_matmuls(graph: GraphProto) -> dict[str, tuple[int, int]]:
    """MatMul nodes whose second input is a 2-D initializer, with its shape [K, N]."""
    shapes = {init.name: tuple(init.dims) for init in graph.initializer}
    return {
        node.name: shapes[node.input[1]]
        for node in graph.node
        if node.op_type == "MatMul" and node.name and len(shapes.get(node.input[1], ())) == 2
    }


def eligible_matmuls(graph: GraphProto) -> set[str]:
    """The constant-weight MatMuls deep enough (K >= MIN_K) for int8 to pay."""
    return {name for name, (k, _) in constant_matmuls(graph).items() if k >= MIN_K}


def readers_by_input(graph: GraphProto, names: set[str]) -> dict[str, list[NodeProto]]:
    """The MatMuls among `names`, grouped by the activation they read (a layer's Q, K and V share one)."""
    readers: dict[str, list[NodeProto]] = defaultdict(list)
    for node in graph.node:
        if node.name in names:
            readers[node.input[0]].append(node)
    return dict(readers)


@dataclass
class Rewrite:
    """What quantize_rows did: MatMul names now in int8 and left in float, and the activations smoothed."""

    int8: list[str]
    floating: list[str]
    smoothed: list[str] = field(default_factory=list)
    shifted: list[str] = field(default_factory=list)  # activations quantised on one side (kiln.export.one_sided)
    switches: dict[str, list[str]] = field(default_factory=dict)  # a switched graph's bool inputs -> their MatMuls
    attentions: int = 0  # Split + MultiHeadAttention pairs now one ai.kiln.SelfAttention (kiln.export.self_attention)
    norms: int = 0  # bias + residual + LayerNormalization now one ai.kiln.SkipLayerNorm (kiln.export.skip_layer_norm)


@dataclass
class Calibrated:
    """What calibration text measured of each int8 input (kiln.export.activation_stats), the weight
    levels the target CPUs allow (kiln.runtime.cpu.INT8_CPUS), and the int8 weights made from them,
    kept so that every graph of one export (the ladder's switched graph, the final graph) rounds each
    group's weights once and the same way."""

    stats: dict[str, ActivationStats]
    weight_levels: int = WEIGHT_LEVELS
    weights: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def quantize_rows(
    model_path: Path,
    out_path: Path,
    keep_float: set[str],
    switched: bool = False,
    calibrated: Calibrated | None = None,
) -> Rewrite:
    """Rewrite every constant-weight MatMul not in keep_float (and at least MIN_K deep).

    With `calibrated` (what calibration text measured of each input), the activations whose
    channels are uneven are smoothed (see `smoothing_factors`) and the weights are rounded with
    error feedback (kiln.export.error_feedback); without, every weight is rounded to nearest.

    `switched` keeps both forms of each group of MatMuls that read one activation, chosen by a bool
    input named `SWITCH + activation` (int8 where true): one session then measures any mix of int8
    and float groups, which is how the export finds what to keep in float in seconds.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    graph = model.graph
    weighted = constant_matmuls(graph)
    eligible = eligible_matmuls(graph)
    chosen = eligible - keep_float
    readers = readers_by_input(graph, chosen)
    weights = {init.name: init for init in graph.initializer}
    opset = next((op.version for op in model.opset_import if op.domain in ("", "ai.onnx")), 17)
    if opset < 13:
        raise UnsupportedModel(f"kiln's int8 needs ONNX opset 13 or newer (--opset; this graph: {opset})")
    before: dict[str, list[NodeProto]] = defaultdict(list)  # new nodes, keyed by the MatMul they go in front of
    made_by, reads = producers(graph), read_counts(graph)
    smoothed, shifted, switches = [], [], {}
    for index, (activation, matmuls) in enumerate(readers.items()):
        prefix = f"kiln_rows_{index}"
        stats = calibrated.stats.get(activation) if calibrated is not None else None
        bound = one_sided.lower_bound(made_by.get(activation))
        columns = [numpy_helper.to_array(weights[m.input[1]]).astype(np.float32) for m in matmuls]
        ranges = None if stats is None else stats.peaks + np.float32(bound or 0)
        factors = smoothing_factors(ranges, np.concatenate(columns, axis=1))
        if factors is not None:
            smoothed.append(activation)
        w8, column_scale = _int8_weights(matmuls, columns, factors, stats, calibrated)
        quantizer = _Quantizer.of(prefix, columns[0].shape[0], factors, bound)
        if quantizer.shift is not None:
            shifted.append(activation)
        shift_back = None if quantizer.shift is None else one_sided.shift_back(w8, column_scale, quantizer.shift)
        foldable = shift_back is not None and not switched and len(matmuls) == 1
        if foldable and one_sided.fold_into_bias(graph, matmuls[0].output[0], shift_back, reads, weights):
            shift_back = None
        made = [_quantize_activation(graph, activation, quantizer)]
        widths = [c.shape[1] for c in columns]
        made += _integer_matmuls(graph, matmuls, widths, w8, column_scale, quantizer, shift_back)
        if switched:
            made = [switch(graph, matmuls, made, SWITCH + activation)]
            switches[SWITCH + activation] = [m.name for m in matmuls]
        before[matmuls[0].name] += made
    replaced = set(chosen)
    if not switched:  # float MatMuls that share an input (Q/K/V kept in float) become one GEMM too
        for matmuls in readers_by_input(graph, eligible - chosen).values():
            if len(matmuls) < 2:
                continue
            columns = [numpy_helper.to_array(weights[m.input[1]]).astype(np.float32) for m in matmuls]
            before[matmuls[0].name] += _packed_float(graph, matmuls, columns)
            replaced |= {m.name for m in matmuls}
    nodes = [
        new
        for node in graph.node
        for new in (*before[node.name], node)
        if not (new.op_type == "MatMul" and new.name in replaced)
    ]
    del graph.node[:]
    graph.node.extend(nodes)
    attentions = 0 if switched else self_attention.fuse(model, opset)
    norms = 0 if switched else skip_layer_norm.fuse(model, opset)
    used = {name for node in with_branches(graph.node) for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for domain in ("com.microsoft", DOMAIN):
        if not any(op.domain == domain for op in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid(domain, 1))
    if chosen and not any(f.name in row_quantize.OPS[row_quantize.DEFINITION] for f in model.functions):
        model.functions.extend(row_quantize.functions(opset))
    onnx.save(model, str(out_path))
    return Rewrite(sorted(chosen), sorted(set(weighted) - chosen), smoothed, shifted, switches, attentions, norms)


def _int8_weights(
    matmuls: list[NodeProto],
    columns: list[np.ndarray],
    factors: np.ndarray | None,
    stats: ActivationStats | None,
    calibrated: Calibrated | None,
) -> tuple[np.ndarray, np.ndarray]:
    """A group's weights side by side (rows times the smoothing factors) as int8 levels, and each
    column's scale: rounded with error feedback where calibration measured the input, else to
    nearest; made once per export (`calibrated.weights`)."""
    from kiln.export.error_feedback import round_with_error_feedback

    key = tuple(m.name for m in matmuls)
    if calibrated is not None and key in calibrated.weights:
        return calibrated.weights[key]
    w = np.concatenate(columns, axis=1)
    if factors is not None:
        w = w * factors[:, None]
    levels = WEIGHT_LEVELS if calibrated is None else calibrated.weight_levels
    column_scale = (np.maximum(np.abs(w).max(axis=0), 1e-12) / levels).astype(np.float32)
    if stats is None:
        w8 = np.clip(np.round(w / column_scale), -levels, levels).astype(np.int8)
    else:
        gram = stats.gram_of(factors)
        w8 = round_with_error_feedback(w, gram, column_scale, levels)
    if calibrated is not None:
        calibrated.weights[key] = (w8, column_scale)
    return w8, column_scale


def smoothing_factors(peaks: np.ndarray | None, weight: np.ndarray) -> np.ndarray | None:
    """Per-channel factors s that move an activation's outlier channels into the weight
    (x / s times s * W is the same product), or None where the channels are even enough.

    A row's int8 scale is set by its largest value; after LayerNorm and GELU a few channels run
    10-24x the median on every token (all-MiniLM-L6-v2), so the rest of the row gets a few levels.
    s = peak^ALPHA / weight_row_peak^(1 - ALPHA) (SmoothQuant's rule, at its default 0.5) evens them
    out. The per-row scale is still computed at run time, so a row's answer still ignores its
    batch-mates; only the per-channel factors come from calibration text.
    """
    if peaks is None or peaks.max() < UNEVEN * np.median(peaks):
        return None
    rows = np.abs(weight).max(axis=1)
    factors = np.maximum(peaks, 1e-5) ** SMOOTHING_ALPHA / np.maximum(rows, 1e-5) ** (1 - SMOOTHING_ALPHA)
    return np.clip(factors, 1e-2, 1e2).astype(np.float32)


@dataclass
class _Quantizer:
    """How one activation is quantised: its tensors' names, the smoothing factors' reciprocals and,
    for an activation bounded below, the shift that puts it on [0, peak] (kiln.export.one_sided):
    255 codes on one side, twice the resolution on the FFN output projection, the MatMul the ladder
    most often returned to float. The row's scale is still its own, so answers still ignore
    batch-mates, and the codes stay 0..255 against 63 weight levels: the sums stay exact in int16 pairs.
    """

    prefix: str
    unsmooth: np.ndarray | None
    shift: np.ndarray | None

    @classmethod
    def of(cls, prefix: str, width: int, factors: np.ndarray | None, bound: float | None) -> _Quantizer:
        unsmooth = None if factors is None else (1 / factors).astype(np.float32)
        if bound is None:
            return cls(prefix, unsmooth, None)
        if unsmooth is None:
            unsmooth = np.ones(width, np.float32)
        return cls(prefix, unsmooth, np.float32(bound) * unsmooth)

    @property
    def levels(self) -> int:
        return LEVELS if self.shift is None else ONE_SIDED_LEVELS

    @property
    def zero_point(self) -> np.uint8:
        return ZERO_POINT if self.shift is None else ONE_SIDED_ZERO_POINT


def _quantize_activation(graph: GraphProto, activation: str, quantizer: _Quantizer) -> NodeProto:
    """The node that turns the float activation (divided by the smoothing factors, if any; shifted,
    if bounded below) into `{prefix}.q` (uint8) and its row peak `{prefix}.scale` (the 1/127, or
    1/255, of the true scale is applied by the quantiser here and by the weight's column scales,
    which saves a kernel): one op, defined in standard ops beside it (kiln.export.row_quantize)."""
    prefix = quantizer.prefix
    _constants(graph, {f"{prefix}.zero_point": quantizer.zero_point})  # the GEMM's too
    unsmooth = shift = None
    if quantizer.unsmooth is not None:
        unsmooth = f"{prefix}.unsmooth"
        _constants(graph, {unsmooth: quantizer.unsmooth})
    if quantizer.shift is not None:
        shift = f"{prefix}.shift"
        _constants(graph, {shift: quantizer.shift})
    return quantize_node(activation, unsmooth, f"{prefix}.q", f"{prefix}.scale", name=f"{prefix}.quantize", shift=shift)


def _integer_matmuls(
    graph: GraphProto,
    matmuls: list[NodeProto],
    widths: list[int],
    w8: np.ndarray,
    column_scale: np.ndarray,
    quantizer: _Quantizer,
    shift_back: np.ndarray | None = None,
) -> list[NodeProto]:
    """One MatMulIntegerToFloat on the quantised activation for all the MatMuls that read it (their
    int8 weights side by side, from `_int8_weights`), then a Split into each MatMul's output. The
    row peaks are its A scale: a scale of shape [..., rows, 1] is applied to each row of the output
    after the column scales (onnxruntime >= 1.20), the same multiply a Mul after it did, in the same
    kernel. A shifted activation's `shift_back`, where no bias took it, is an Add after the GEMM
    (MatMulIntegerToFloat's own bias input is added before the A scale, so it cannot carry it)."""
    from onnx import helper

    name, prefix = f"{matmuls[0].name}.int8", quantizer.prefix
    weight_scale = column_scale / np.float32(quantizer.levels)
    _constants(graph, {f"{name}.weight": w8, f"{name}.weight_scale": weight_scale})
    scaled = matmuls[0].output[0] if len(matmuls) == 1 else f"{name}.packed"
    product = scaled if shift_back is None else f"{name}.shifted"
    nodes = [
        helper.make_node(
            "MatMulIntegerToFloat",
            [f"{prefix}.q", f"{name}.weight", f"{prefix}.scale", f"{name}.weight_scale", f"{prefix}.zero_point"],
            [product],
            name=f"{name}.matmul",
            domain="com.microsoft",
        )
    ]
    if shift_back is not None:
        _constants(graph, {f"{name}.shift_back": shift_back.astype(np.float32)})
        nodes.append(helper.make_node("Add", [product, f"{name}.shift_back"], [scaled], name=f"{name}.shift_back"))
    if len(matmuls) > 1:
        _constants(graph, {f"{name}.widths": np.array(widths, dtype=np.int64)})
        nodes.append(
            helper.make_node(
                "Split", [scaled, f"{name}.widths"], [m.output[0] for m in matmuls], name=f"{name}.split", axis=-1
            )
        )
    return nodes


def _packed_float(graph: GraphProto, matmuls: list[NodeProto], columns: list[np.ndarray]) -> list[NodeProto]:
    """One float MatMul on the weights side by side, split into each MatMul's output: a layer's Q, K
    and V kept in float run as one GEMM, as the fp32 graph's fused Attention runs them (three small
    GEMMs made a graph with most groups in float slower than the fp32 package)."""
    from onnx import helper

    name = f"{matmuls[0].name}.packed"
    widths = np.array([c.shape[1] for c in columns], dtype=np.int64)
    _constants(graph, {f"{name}.weight": np.concatenate(columns, axis=1), f"{name}.widths": widths})
    return [
        helper.make_node("MatMul", [matmuls[0].input[0], f"{name}.weight"], [f"{name}.out"], name=f"{name}.matmul"),
        helper.make_node(
            "Split", [f"{name}.out", f"{name}.widths"], [m.output[0] for m in matmuls], name=f"{name}.split", axis=-1
        ),
    ]


def _constants(graph: GraphProto, values: dict[str, np.generic | np.ndarray]) -> None:
    from onnx import numpy_helper

    graph.initializer.extend(numpy_helper.from_array(np.asarray(value), name) for name, value in values.items())
