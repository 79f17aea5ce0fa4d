"""Which CPU a figure came from, and which int8 instructions it has.

onnxruntime's int8 GEMM differs by instruction set (AVX2's vpmaddubsw sums product pairs in int16;
AVX-512 VNNI and AVX-VNNI's vpdpbusd and ARM's dot products sum in int32), so an int8 speed figure
means little without it. kiln's int8 levels are exact on every one of them (kiln.export.rowwise_int8),
so a package is safe anywhere; the export and the bench record where they measured.
"""

from __future__ import annotations

import platform
from pathlib import Path

# the best int8 dot-product instructions first; names as /proc/cpuinfo spells the flags
_INT8_KERNELS = (("avx512_vnni", "avx512-vnni"), ("avx_vnni", "avx-vnni"), ("avx512bw", "avx512"), ("avx2", "avx2"))


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields from /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_name() -> str:
    info = _cpuinfo()
    return info.get("model name") or info.get("Model") or platform.processor() or "unknown CPU"


def int8_kernel() -> str:
    """The int8 instruction set onnxruntime's kernels use here: avx512-vnni, avx-vnni, avx512, avx2,
    arm64-dot (ARM's sdot/udot), or the machine's name where none of these is present."""
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    if "asimddp" in flags:
        return "arm64-dot"
    return next((name for flag, name in _INT8_KERNELS if flag in flags), platform.machine() or "unknown")
