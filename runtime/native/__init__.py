"""kiln's own onnxruntime kernels, compiled into the wheel where a C compiler built them.

- ai.kiln.RowQuantize2 (and RowQuantizeSmoothed2; RowQuantize and RowQuantizeSmoothed in packages
  made before 2026-12-05), the per-row quantiser of kiln's int8 graphs (kiln.export.rowwise_int8) in
  one kernel instead of four to six standard ones (`row_quantize.c`): the same bits as those ops.
- ai.kiln.SelfAttention, Split + MultiHeadAttention over a packed Q, K, V projection
  (kiln.export.self_attention, `attention.c`): the same answers to float rounding, not the same bits.
- ai.kiln.SkipLayerNorm, bias + residual + LayerNormalization (kiln.export.skip_layer_norm,
  `layer_norm.c`): the same answers to float rounding, not the same bits.

A graph that uses them also defines them as ONNX functions of the standard (and onnxruntime contrib)
ops they stand for, so a package loads and answers without the library (onnxruntime inlines the
functions): on a platform where the wheel has no library, from a source tree not built, or with
KILN_NATIVE_KERNELS=0, which turns it off to compare. `kernels.c` registers them; `ort_abi.h`
declares the part of onnxruntime's C ABI they use.
"""

from __future__ import annotations

import os
from pathlib import Path

DOMAIN = "ai.kiln"
# (x) -> (q uint8, row peak) and (x, per-channel factors) -> (q uint8, row peak), in two definitions
# (row_quantize.c): (x / peak) / (1 / 127) until 2026-12-05, x * (127 / peak) since
ROW_QUANTIZE, ROW_QUANTIZE_SMOOTHED = "RowQuantize", "RowQuantizeSmoothed"
ROW_QUANTIZE2, ROW_QUANTIZE_SMOOTHED2 = "RowQuantize2", "RowQuantizeSmoothed2"
# (x, per-channel factors, per-channel shift) -> (q uint8 on one side, zero point 0, row peak): x * (255 / peak)
ROW_QUANTIZE_SHIFTED2 = "RowQuantizeShifted2"
SELF_ATTENTION = "SelfAttention"  # (qkv, bias, key lengths) {num_heads} -> attention output
SKIP_LAYER_NORM = "SkipLayerNorm"  # (x, bias, skip, gamma, beta) {epsilon} -> LayerNorm((x + bias) + skip)


def kernels_library() -> Path | None:
    """The compiled kernels beside this module, or None where there are none or they are turned off."""
    if os.environ.get("KILN_NATIVE_KERNELS", "1") == "0":
        return None
    return next(iter(sorted(Path(__file__).parent.glob("_kernels*.so"))), None)
