"""Graph form by execution target: what each provider runs fastest, and what it can take at all.

onnxruntime's fused contrib ops (`Attention`, `SkipLayerNormalization`, `BiasGelu`, all in the
`com.microsoft` domain) are fast on the CPU and CUDA providers, but TensorRT cannot take them: a
TensorRT package that holds them falls back to CUDA for exactly the layers that matter. So:

- cpu: onnxruntime's CPU fusions but SkipLayerNormalization (slower than the Add and
  LayerNormalization it fuses; kiln.export.optimize); for int8 the Q/K/V projections stay separate MatMuls, where
  kiln's int8 pass reaches them. fp16 stays unfused (it runs on CPU only when asked to).
- cuda: the fully fused graph (fused `Attention` with packed Q/K/V); fp16 as a fused fp16 graph
  with float32 inputs and outputs. int8 is refused: the CUDA provider has no fused int8 encoder.
- tensorrt: standard ONNX ops only (TensorRT fuses for itself); fp16 as an fp16 graph of standard
  ops; int8 as explicit QuantizeLinear/DequantizeLinear on the activations and weights of every
  MatMul, calibrated (`int8-static`).
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.runtime.cpu import INT8_CPUS
from kiln.runtime.errors import UnsupportedModel

TARGETS = ("cpu", "cuda", "tensorrt")
# --quantize value -> the precision it gives on each target (None: refused there)
_PRECISIONS: dict[str, dict[str, str | None]] = {
    "none": {"cpu": "fp32", "cuda": "fp32", "tensorrt": "fp32"},
    "fp16": {"cpu": "fp16", "cuda": "fp16", "tensorrt": "fp16"},
    "int8": {"cpu": "int8-dynamic", "cuda": None, "tensorrt": "int8-static"},
    "int8-static": {"cpu": "int8-static", "cuda": None, "tensorrt": "int8-static"},
}
_INT8_ON_CUDA = (
    "int8 on --device cuda is not offered: the CUDA provider has no fused int8 encoder kernels, so it would be "
    "slower than fp16; use --device cuda --quantize fp16, or --device tensorrt --quantize int8 (explicit Q/DQ)"
)


@dataclass(frozen=True)
class GraphForm:
    """How the exported graph is shaped for its target."""

    target: str
    precision: str
    fusions: str | None  # "cpu" | "cuda": onnxruntime's transformer fusions for that provider; None: standard ops
    int8_cpus: str = "any"  # kiln's CPU int8: the CPUs it must be exact on (kiln.runtime.cpu.INT8_CPUS)

    @property
    def standard_ops_only(self) -> bool:
        return self.fusions is None

    @property
    def calibrates(self) -> bool:
        """Whether text sets its scales (and chooses what stays in float): then it is held apart
        from the text that validates."""
        return self.precision.startswith("int8")


def graph_form(target: str, quantize: str, int8_cpus: str = "any") -> GraphForm:
    if target not in TARGETS:
        raise UnsupportedModel(f"--device must be one of {', '.join(TARGETS)}, got {target!r}")
    if quantize not in _PRECISIONS:
        raise UnsupportedModel(f"--quantize must be one of {', '.join(_PRECISIONS)}, got {quantize!r}")
    precision = _PRECISIONS[quantize][target]
    if precision is None:
        raise UnsupportedModel(_INT8_ON_CUDA)
    if int8_cpus not in INT8_CPUS:
        raise UnsupportedModel(f"--int8-cpus must be one of {', '.join(INT8_CPUS)}, got {int8_cpus!r}")
    if int8_cpus != "any" and precision != "int8-dynamic":
        raise UnsupportedModel(
            f"--int8-cpus {int8_cpus} shapes kiln's CPU int8 (--quantize int8 --device cpu), "
            f"not {precision} on {target}"
        )
    return GraphForm(target, precision, _fusions(target, precision), int8_cpus)


def _fusions(target: str, precision: str) -> str | None:
    if target == "tensorrt" or precision == "int8-static":
        return None  # Q/DQ needs the plain MatMuls; onnxruntime fuses Q/DQ itself when it loads the graph
    if target == "cpu" and precision == "fp16":
        return None  # the fp16 converter's casts collide on weights the CPU-fused graph shares
    return target
