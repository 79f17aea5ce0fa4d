"""Lower-precision graphs: kiln's accurate int8, calibrated static int8, and fp16.

kiln's int8 uses two kernels, each where it is right:
- MatMuls that read a LayerNorm or attention output: activations smoothed (kiln.export.smooth),
  then onnxruntime's fused dynamic int8 (per-tensor u8 activations, per-channel s8 weights, VNNI).
- MatMuls that read a GELU output (the FFN's second projection, where outliers are worst and
  smoothing does not reach): MatMulNBits with 8-bit symmetric weight blocks and accuracy_level 4,
  which quantises activations per row and per block of K at run time.
- The task head stays in float.
Packages run one text per session call (manifest max_batch_size 1), so a per-tensor scale is a
per-text scale and no text's answer depends on its batch-mates.
"""

from __future__ import annotations

import functools
import logging
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from kiln.export.figures import Fidelity

# the largest block that divides K, up to 256: larger blocks ran faster here (roberta-base, one text
# at a time: 128 -> 22.5 ms, 256 -> 20.6 ms, 64 -> 26.0 ms) at a small cost in accuracy
BLOCK_SIZE = 256
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

    model = onnx.load(str(model_path), load_external_data=False)
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    return {
        node.name: shapes[node.input[1]]
        for node in model.graph.node
        if node.op_type == "MatMul" and node.input[1] in shapes and len(shapes[node.input[1]]) == 2
    }


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


def post_activation_matmuls(model_path: Path) -> set[str]:
    """MatMuls whose input comes straight from a GELU/ReLU (the FFN's second projection)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    producers = {out: node for node in model.graph.node for out in node.output}
    return {
        node.name
        for node in model.graph.node
        if node.op_type == "MatMul"
        and node.input[0] in producers
        and producers[node.input[0]].op_type in ("Gelu", "BiasGelu", "FastGelu", "Relu", "QuickGelu")
    }


@_quietly
def quantize_int8(
    model_path: Path,
    out_path: Path,
    keep_float: list[str],
    feeds: list[dict[str, np.ndarray]],
    rowwise_everywhere: bool = False,
) -> QuantInfo:
    """kiln's int8 (see the module docstring). `rowwise_everywhere` puts every MatMul on the
    per-row kernel: slower, more accurate, the step before keeping layers in float."""
    import onnx
    from kiln.export.smooth import smooth
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    weights = matmul_weights(model_path)
    too_small = {name for name, (k, _) in weights.items() if k < 16}
    floating = {*keep_float, *too_small} & set(weights)
    rowwise = (set(weights) if rowwise_everywhere else post_activation_matmuls(model_path)) - floating
    dynamic = set(weights) - floating - rowwise
    smoothed_path = out_path.with_suffix(".smoothed.onnx")
    dynamic_path = out_path.with_suffix(".dynamic.onnx")
    smoothed = 0
    if dynamic:
        smoothed = smooth(model_path, smoothed_path, dynamic, feeds)
        quantize_dynamic(
            str(smoothed_path),
            str(dynamic_path),
            per_channel=True,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
            nodes_to_exclude=sorted(floating | rowwise),
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    block = min(BLOCK_SIZE, *(_largest_pow2_divisor(weights[n][0]) for n in rowwise)) if rowwise else BLOCK_SIZE
    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(dynamic_path if dynamic else model_path)),
        bits=8,
        block_size=max(block, 16),
        is_symmetric=True,
        accuracy_level=4,
        nodes_to_exclude=sorted(floating),
        op_types_to_quantize=("MatMul",),
    )
    quantizer.process()
    quantizer.model.save_model_to_file(str(out_path), use_external_data_format=False)
    smoothed_path.unlink(missing_ok=True)
    dynamic_path.unlink(missing_ok=True)
    return QuantInfo(
        scheme="int8: smoothed per-tensor dynamic activations x per-channel weights (onnxruntime dynamic int8) "
        f"for {len(dynamic)} MatMuls; per-row blocked activations x 8-bit weight blocks of {max(block, 16)} "
        f"(MatMulNBits, accuracy_level 4) for {len(rowwise)} {'' if rowwise_everywhere else 'post-GELU '}MatMuls; "
        "one text per call",
        quantized=len(dynamic) + len(rowwise),
        kept_float=sorted(floating),
        details={
            "dynamic_matmuls": len(dynamic),
            "rowwise_matmuls": len(rowwise),
            "smoothed_activations": smoothed,
            "smoothing_alpha": 0.5,
            "block_size": max(block, 16),
            "calibration_texts": len(feeds),
        },
    )


def _largest_pow2_divisor(k: int) -> int:
    return k & -k


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


def choose_float_layers(
    model_path: Path,
    work_dir: Path,
    evaluate: Callable[[Path], Fidelity],
    target: float,
    always_float: list[str],
    feeds: list[dict[str, np.ndarray]],
    rowwise_everywhere: bool = True,
    by_projection: bool = False,
) -> tuple[list[str], list[dict[str, object]]]:
    """kiln's int8 with the fewest groups in float that reach the target (the task head and
    `always_float` stay in float throughout): whole encoder layers, or (`by_projection`) a layer's
    MatMuls that read one tensor (Q/K/V together, the attention output, each FFN projection)."""
    weighted = [n for n in matmul_weights(model_path) if n not in always_float]
    if by_projection:
        groups = {g: [n for n in members if n in weighted] for g, members in matmul_groups(model_path).items()}
        groups = {g: members for g, members in groups.items() if members and g != "other"}
    else:
        groups = layer_groups(weighted)

    def write(floating: list[str], path: Path) -> None:
        quantize_int8(model_path, path, floating + always_float, feeds, rowwise_everywhere)

    kept, trials = keep_sensitive_in_float(groups, write, evaluate, target, work_dir / "probe.onnx")
    return list(always_float) + kept, trials


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
