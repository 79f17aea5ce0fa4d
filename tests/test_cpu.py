"""kiln.runtime.cpu names this machine's CPU and its int8 instructions, as the bench and kiln.json print
them, and refuses an int8 package exported for CPUs this one is not."""

from __future__ import annotations

from pathlib import Path

import pytest
from kiln.runtime import cpu
from kiln.runtime.errors import PackageError

AVX2_ONLY = {"model name": "AMD EPYC 7B12", "flags": "fpu sse2 avx avx2 fma"}
ZEN4 = {"model name": "AMD EPYC 9B14", "flags": "avx2 avx512f avx512bw avx512_vnni"}


def test_the_int8_kernel_follows_the_cpu_flags():
    flags = Path("/proc/cpuinfo").read_text().split("\n\n", 1)[0]
    kernel = cpu.int8_kernel()
    assert kernel in {"amx", "avx512-vnni", "avx-vnni", "avx512", "avx2", "arm64-dot"}
    assert ("amx_int8" in flags) == (kernel == "amx")
    assert ("avx512_vnni" in flags and "amx_int8" not in flags) == (kernel == "avx512-vnni")
    assert cpu.cpu_name() != "unknown CPU"


@pytest.mark.parametrize(
    ("info", "kernel", "cpus"),
    [
        (AVX2_ONLY, "avx2", "any"),
        ({"flags": "avx2 avx512f avx512bw"}, "avx512", "any"),  # Skylake-X: vpmaddubsw, int16 pairs
        (ZEN4, "avx512-vnni", "vnni"),
        ({"flags": "avx2 avx_vnni"}, "avx-vnni", "vnni"),
        ({"flags": "avx512_vnni amx_int8 amx_tile"}, "amx", "vnni"),
        ({"Features": "fp asimd asimddp"}, "arm64-dot", "vnni"),
    ],
)
def test_which_int8_packages_a_cpu_runs(monkeypatch, info, kernel, cpus):
    monkeypatch.setattr(cpu, "_cpuinfo", lambda: info)
    assert (cpu.int8_kernel(), cpu.int8_cpus_here()) == (kernel, cpus)


def test_a_vnni_package_is_refused_where_int8_sums_would_saturate(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu, "_cpuinfo", lambda: AVX2_ONLY)
    cpu.check_int8_cpus(tmp_path, {"int8_cpus": "any", "weight_levels": 63})
    cpu.check_int8_cpus(tmp_path, {})  # fp32, fp16 and packages from before --int8-cpus: any CPU
    with pytest.raises(PackageError, match=r"--int8-cpus vnni .*AMD EPYC 7B12, avx2.*--int8-cpus any"):
        cpu.check_int8_cpus(tmp_path, {"int8_cpus": "vnni", "weight_levels": 127})
    with pytest.raises(PackageError, match="'avx9'"):
        cpu.check_int8_cpus(tmp_path, {"int8_cpus": "avx9"})
    monkeypatch.setattr(cpu, "_cpuinfo", lambda: ZEN4)
    cpu.check_int8_cpus(tmp_path, {"int8_cpus": "vnni", "weight_levels": 127})
