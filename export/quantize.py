"""Lower-precision graphs: kiln's accurate int8, calibrated static int8, and fp16.

kiln's int8 stores MatMul weights as 8-bit symmetric blocks (per output column, 128 rows a block)
and runs onnxruntime's MatMulNBits kernel with accuracy_level 4, which quantises activations per
row and per block at run time. Each token row gets its own scale, so a text's answer never depends
on what else is in its batch (per-tensor dynamic int8 shares one scale across the batch), and
outlier tokens cost only their own row's precision.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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


def _silence() -> None:
    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    logging.disable(logging.INFO)


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


def layer_groups(nodes: list[str]) -> dict[str, list[str]]:
    """Group MatMul node names by encoder layer ('layer.3'), the unit kept in float when needed."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name in nodes:
        match = _LAYER.search(name)
        groups[f"layer.{match.group(1)}" if match else "other"].append(name)
    return dict(groups)


def quantize_int8(model_path: Path, out_path: Path, keep_float: list[str]) -> QuantInfo:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    _silence()
    weights = matmul_weights(model_path)
    # the kernel needs K to be a multiple of the block; tiny models get a smaller block
    block = min(BLOCK_SIZE, *(_largest_pow2_divisor(k) for k, _ in weights.values()))
    too_small = [name for name, (k, _) in weights.items() if k < 16]
    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(model_path)),
        bits=8,
        block_size=max(block, 16),
        is_symmetric=True,
        accuracy_level=4,
        nodes_to_exclude=sorted({*keep_float, *too_small}),
        op_types_to_quantize=("MatMul",),
    )
    quantizer.process()
    quantizer.model.save_model_to_file(str(out_path), use_external_data_format=False)
    kept = sorted({*keep_float, *too_small} & set(weights))
    return QuantInfo(
        scheme=f"int8 weights (symmetric, per column, blocks of {max(block, 16)} along K) x int8 activations "
        "quantised per row and block at run time (onnxruntime MatMulNBits bits=8, accuracy_level=4)",
        quantized=len(weights) - len(kept),
        kept_float=kept,
        details={"block_size": max(block, 16), "weights": "int8 symmetric", "activations": "int8 per row"},
    )


def _largest_pow2_divisor(k: int) -> int:
    return k & -k


@dataclass
class Fidelity:
    """How close a candidate graph is to the reference: a pass/fail score and a finer error."""

    score: float  # top-1 agreement, or minimum cosine for embeddings
    error: float  # mean absolute output error, to rank layers whose score ties


def choose_float_layers(
    model_path: Path,
    work_dir: Path,
    evaluate: Callable[[Path], Fidelity],
    target: float,
    always_float: list[str],
) -> tuple[list[str], list[dict[str, object]]]:
    """Keep the fewest encoder layers in float that bring the score up to target.

    Sensitivity is measured one layer at a time (that layer alone in int8, the rest in float);
    layers then go back to float from the most sensitive down until the quantised rest reaches
    the target. Returns the node names to keep in float and the measurements, for the manifest.
    """
    groups = layer_groups([n for n in matmul_weights(model_path) if n not in always_float])
    probe = work_dir / "probe.onnx"
    trials: list[dict[str, object]] = []
    for name in groups:
        others = [n for group, members in groups.items() if group != name for n in members]
        quantize_int8(model_path, probe, keep_float=others + always_float)
        alone = evaluate(probe)
        trials.append({"group": name, "alone_score": alone.score, "alone_error": alone.error})
    trials.sort(key=lambda t: (t["alone_score"], -t["alone_error"]))
    kept: list[str] = list(always_float)
    for trial in trials:
        kept.extend(groups[str(trial["group"])])
        quantize_int8(model_path, probe, keep_float=kept)
        trial["score_after_keeping"] = evaluate(probe).score
        if trial["score_after_keeping"] >= target:
            break
    probe.unlink(missing_ok=True)
    return kept, trials


def quantize_static_int8(model_path: Path, out_path: Path, feeds: list[dict[str, np.ndarray]]) -> QuantInfo:
    """Symmetric int8 QDQ with MinMax calibration, the form TensorRT consumes.

    Calibration batches must all have one length (entropy/percentile calibrators fail otherwise),
    so the caller pads them to one length.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    _silence()

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds: Iterator[dict[str, np.ndarray]] = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._feeds, None)

    quantize_static(
        str(model_path),
        str(out_path),
        _Reader(),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )
    return QuantInfo(
        scheme="static int8 QDQ, symmetric activations and per-channel weights, MinMax calibration",
        quantized=len(matmul_weights(model_path)),
        details={"calibration_batches": len(feeds)},
    )


def convert_fp16(model_path: Path, out_path: Path) -> QuantInfo:
    """fp16 weights and compute, float32 inputs and outputs, overflow-prone ops kept in float32."""
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(model_path)))
    model.convert_float_to_float16(keep_io_types=True, op_block_list=FP16_KEEP_FLOAT)
    model.save_model_to_file(str(out_path))
    return QuantInfo(scheme="fp16 with float32 IO", kept_float=FP16_KEEP_FLOAT)
