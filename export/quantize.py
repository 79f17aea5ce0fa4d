"""Lower-precision graphs: kiln's int8 (per-row, batch-invariant), the steps that keep its most
sensitive MatMuls in float, and fp16. Calibrated explicit int8 lives in kiln.export.qdq."""

from __future__ import annotations

import functools
import logging
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kiln.export.figures import Fidelity
from kiln.export.rowwise_int8 import (
    LEVELS,
    ONE_SIDED_LEVELS,
    SMOOTHING_ALPHA,
    WEIGHT_LEVELS,
    Calibrated,
    constant_matmuls,
    quantize_rows,
)
from kiln.runtime.cpu import INT8_CPUS, cpu_name, int8_kernel

# overflow-prone or precision-critical ops that stay in float32 inside an fp16 graph
FP16_KEEP_FLOAT = [
    "LayerNormalization",
    "SkipLayerNormalization",
    "Softmax",
    "ReduceMean",
    "Pow",
    "Sqrt",
    "Div",
    "Erf",
    "Exp",
    "Range",
    "CumSum",
    "Gather",
]
_LAYER = re.compile(r"(?:layer|layers|block)[./_](\d+)[./_]")


@dataclass
class QuantInfo:
    """What a quantisation pass did, for the manifest."""

    scheme: str
    quantized: int = 0
    kept_float: list[str] = field(default_factory=list)
    details: dict[str, object] = field(default_factory=dict)


def _quietly(function: Callable) -> Callable:
    """onnxruntime's quantizers log advice through the root logger; keep it out of kiln's output."""

    @functools.wraps(function)
    def wrapper(*args: object, **kwargs: object) -> object:
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            return function(*args, **kwargs)
        finally:
            logging.disable(previous)

    return wrapper


def matmul_weights(model_path: Path) -> dict[str, tuple[int, int]]:
    """MatMul nodes with a constant weight, and the weight's shape [K, N]."""
    import onnx

    return constant_matmuls(onnx.load(str(model_path), load_external_data=False).graph)


def head_matmuls(model_path: Path) -> list[str]:
    """MatMuls outside the encoder layers: the task head (classifier, QA span, MLM projection)."""
    return layer_groups(list(matmul_weights(model_path))).get("other", [])


def layer_of(node: str) -> str | None:
    """The encoder layer a node belongs to ('layer.3'), from its exported name; None for the head."""
    match = _LAYER.search(node)
    return f"layer.{match.group(1)}" if match else None


def layer_groups(nodes: list[str]) -> dict[str, list[str]]:
    """Group MatMul node names by encoder layer ('layer.3'), the unit kept in float when needed."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name in nodes:
        groups[layer_of(name) or "other"].append(name)
    return dict(groups)


def int8_scheme(levels: int, rounding: str, where: str) -> str:
    """The manifest's one-line account of kiln's int8 (`where`: what it covers)."""
    return (
        f"int8: per-row activations ({LEVELS} levels a side, scale computed per token at run time) x "
        f"per-column int8 weights ({levels} levels, {rounding}), exact int32 sums (MatMulIntegerToFloat) on "
        f"{where}; answers do not depend on batch-mates"
    )


def quantize_int8(
    model_path: Path, out_path: Path, keep_float: list[str], calibrated: Calibrated | None = None
) -> QuantInfo:
    """kiln's int8 (kiln.export.rowwise_int8) on every MatMul but those kept in float; with what
    calibration text measured, the uneven activations are smoothed and the weights rounded with
    error feedback."""
    done = quantize_rows(model_path, out_path, set(keep_float), calibrated=calibrated)
    levels = WEIGHT_LEVELS if calibrated is None else calibrated.weight_levels
    smoothing = f", {len(done.smoothed)} inputs smoothed per channel" if done.smoothed else ""
    if done.shifted:
        smoothing += f", {len(done.shifted)} bounded inputs (GELU's) on one side ({ONE_SIDED_LEVELS} levels)"
    rounding = (
        "error feedback on calibration activations" if calibrated is not None and calibrated.stats else "to nearest"
    )
    return QuantInfo(
        scheme=int8_scheme(levels, rounding, f"{len(done.int8)} MatMuls{smoothing}"),
        quantized=len(done.int8),
        kept_float=done.floating,
        details={
            "int8_matmuls": len(done.int8),
            "activation_levels": LEVELS,
            "weight_rounding": rounding,
            "weight_levels": levels,
            "int8_cpus": next(cpus for cpus, n in INT8_CPUS.items() if n == levels),  # checked as it loads
            "smoothed_inputs": len(done.smoothed),
            "one_sided_inputs": len(done.shifted),  # quantised on [0, peak] with 255 levels (rowwise_int8._Quantizer)
            "smoothing_alpha": SMOOTHING_ALPHA,
            "self_attentions": done.attentions,
            "skip_layer_norms": done.norms,
            "calibrated": "smoothing factors per channel" if done.smoothed else False,
            "measured_on": {"cpu": cpu_name(), "int8_kernel": int8_kernel()},
        },
    )


Writer = Callable[[list[str], Path], None]  # (MatMuls to keep in float, output path)


def keep_sensitive_in_float(
    groups: dict[str, list[str]], write: Writer, evaluate: Callable[[Path], Fidelity], target: float, probe: Path
) -> tuple[list[str], list[dict[str, object]]]:
    """Keep the fewest groups of MatMuls in float that bring the score up to target.

    Sensitivity is measured one group at a time (that group alone in int8, the rest in float);
    groups then go back to float from the most sensitive down until the quantised rest reaches
    the target. Returns the MatMuls kept in float and the measurements, for the manifest.
    """
    trials: list[dict[str, object]] = []
    for name in groups:
        write([n for group, members in groups.items() if group != name for n in members], probe)
        alone = evaluate(probe)
        trials.append({"group": name, "alone_score": alone.score, "alone_error": alone.error})
    trials.sort(key=lambda t: (t["alone_score"], -t["alone_error"]))
    kept: list[str] = []
    for trial in trials:
        kept.extend(groups[str(trial["group"])])
        write(kept, probe)
        trial["score_after_keeping"] = evaluate(probe).score
        if trial["score_after_keeping"] >= target:
            break
    probe.unlink(missing_ok=True)
    return kept, trials


def matmul_groups(model_path: Path) -> dict[str, list[str]]:
    """MatMuls by encoder layer and the activation they read ('layer.3 <- tensor'): Q, K and V share
    one group; the task head's MatMuls are 'other'."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    groups: dict[str, list[str]] = defaultdict(list)
    for node in graph.node:
        if node.op_type == "MatMul":
            layer = layer_of(node.name)
            groups["other" if layer is None else f"{layer} <- {node.input[0]}"].append(node.name)
    return dict(groups)


def convert_fp16(model_path: Path, out_path: Path, fused: bool = False) -> QuantInfo:
    """fp16 weights and compute, float32 inputs and outputs. In a standard-ops graph the
    overflow-prone ops stay in float32; a fused graph's contrib ops (SkipLayerNormalization,
    Attention) accumulate in float32 inside their fp16 kernels, so it converts whole."""
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(model_path)))
    keep = None if fused else FP16_KEEP_FLOAT
    model.convert_float_to_float16(keep_io_types=True, op_block_list=keep)
    model.save_model_to_file(str(out_path))
    return QuantInfo(scheme="fp16 with float32 IO" + (", fused graph" if fused else ""), kept_float=keep or [])
