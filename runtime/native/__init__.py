"""kiln's own onnxruntime kernels, compiled into the wheel where a C compiler built them.

One for now: ai.kiln.RowQuantize (and RowQuantizeSmoothed), the per-row quantiser of kiln's int8
graphs (kiln.export.rowwise_int8) in one kernel instead of four or five standard ones
(`row_quantize.c`). A graph that uses it also defines it as an ONNX function of exactly those
standard ops, so a package loads and answers the same bits without the library (onnxruntime
inlines the function): on a platform where the wheel has no library, from a source tree not built,
or with KILN_NATIVE_KERNELS=0, which turns it off to compare.
"""

from __future__ import annotations

import os
from pathlib import Path

DOMAIN = "ai.kiln"
ROW_QUANTIZE = "RowQuantize"  # (x) -> (q uint8, row peak)
ROW_QUANTIZE_SMOOTHED = "RowQuantizeSmoothed"  # (x, per-channel factors) -> (q uint8, row peak)


def kernels_library() -> Path | None:
    """The compiled kernels beside this module, or None where there are none or they are turned off."""
    if os.environ.get("KILN_NATIVE_KERNELS", "1") == "0":
        return None
    return next(iter(sorted(Path(__file__).parent.glob("_kernels*.so"))), None)
