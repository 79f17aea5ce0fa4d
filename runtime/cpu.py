"""Which CPU a figure came from, which int8 instructions it has, and which int8 packages it runs.

onnxruntime's int8 GEMM differs by instruction set (AVX2's and plain AVX-512's vpmaddubsw sum
product pairs in int16, which saturates; AVX-512 VNNI and AVX-VNNI's vpdpbusd, AMX's tdpbusd and
ARM's dot products sum in int32), so an int8 speed figure means little without it. kiln's int8 is
exported for the CPUs named (`kiln export --int8-cpus`): `any` keeps 63 weight levels a side, whose
sums are exact on every kernel; `vnni` keeps 127, exact only where products are summed in int32, and
such a package refuses to load elsewhere rather than give other answers. The export and the bench
record where they measured.
"""

from __future__ import annotations

import platform
from pathlib import Path

from kiln.runtime.errors import PackageError

# the best int8 dot-product instructions first; names as /proc/cpuinfo spells the flags
_INT8_KERNELS = (
    ("amx_int8", "amx"),  # onnxruntime's AMX GEMM for larger shapes, AVX-512 VNNI for the rest
    ("avx512_vnni", "avx512-vnni"),
    ("avx_vnni", "avx-vnni"),
    ("avx512bw", "avx512"),
    ("avx2", "avx2"),
)
# kernels that sum u8 x s8 products in int32, exact at 127 weight levels a side
_INT32_SUMS = frozenset({"amx", "avx512-vnni", "avx-vnni", "arm64-dot"})
# `kiln export --int8-cpus`: the CPUs an int8 package runs on -> its weight levels a side
INT8_CPUS = {"any": 63, "vnni": 127}


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
    """The int8 instruction set onnxruntime's kernels use here: amx, avx512-vnni, avx-vnni, avx512, avx2,
    arm64-dot (ARM's sdot/udot), or the machine's name where none of these is present."""
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    if "asimddp" in flags:
        return "arm64-dot"
    return next((name for flag, name in _INT8_KERNELS if flag in flags), platform.machine() or "unknown")


def int8_cpus_here() -> str:
    """The widest `--int8-cpus` this machine runs exactly: vnni where int8 sums are int32, else any."""
    return "vnni" if int8_kernel() in _INT32_SUMS else "any"


def check_int8_cpus(directory: Path, quantization: dict) -> None:
    """Refuse an int8 package exported for CPUs this one is not: its sums would saturate here and
    its answers differ from the ones its gate proved."""
    asked = quantization.get("int8_cpus", "any")
    if asked not in INT8_CPUS:
        raise PackageError(
            f"{directory}: kiln.json asks for int8 CPUs {asked!r}; this kiln knows {', '.join(INT8_CPUS)}"
        )
    if asked == "vnni" and int8_cpus_here() != "vnni":
        raise PackageError(
            f"{directory}: this int8 package was exported with --int8-cpus vnni ({INT8_CPUS['vnni']} weight levels), "
            f"which needs int8 sums in int32 (AVX-512 VNNI, AVX-VNNI, AMX or ARM dot products); this CPU "
            f"({cpu_name()}, {int8_kernel()}) would saturate them and change answers. Export it again with "
            "--int8-cpus any (exact on every CPU), or run it on a CPU with VNNI"
        )
