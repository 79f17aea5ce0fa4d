"""kiln.runtime.cpu names this machine's CPU and its int8 instructions, as the bench and kiln.json print them."""

from __future__ import annotations

from pathlib import Path

from kiln.runtime.cpu import cpu_name, int8_kernel


def test_the_int8_kernel_follows_the_cpu_flags():
    flags = Path("/proc/cpuinfo").read_text().split("\n\n", 1)[0]
    kernel = int8_kernel()
    assert kernel in {"avx512-vnni", "avx-vnni", "avx512", "avx2", "arm64-dot"}
    assert ("avx512_vnni" in flags) == (kernel == "avx512-vnni")
    assert cpu_name() != "unknown CPU"
