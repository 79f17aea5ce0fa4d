"""`kiln bench gpu`, the GPU table layout, run end to end on CPU with tiny packages (the GPU run is
the same command with a GPU provider; see bench/gpu.sh)."""

from __future__ import annotations

import json

from conftest import run_kiln


def test_gpu_table_on_cpu(exported, tiny_model, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n".join(["The central bank raised rates again.", "경기는 연장전 끝에 끝났다.", "Alice lives in Seoul."] * 8)
    )
    packages = [exported("bert", "text-classification", "none", "tensorrt"), exported("bert", "text-classification")]
    out = tmp_path / "out"
    result = run_kiln(
        "bench", "gpu", *map(str, packages),
        "--provider", "cpu", "--source", str(tiny_model("bert", "text-classification")), "--corpus", str(corpus),
        "--batch-sizes", "1,4", "--lengths", "8,32", "--torch", "fp32,fp16", "--cell-seconds", "0.05",
        "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    gpu = json.loads((out / "results.json").read_text())["gpu"]
    engines = ["PyTorch eager fp32", "kiln fp32 (tensorrt graph) on cpu", "kiln fp32 (cpu graph) on cpu"]
    assert [a["engine"] for a in gpu["accuracy"]] == engines
    for row in gpu["accuracy"]:  # fp32 everywhere: the same labels as PyTorch, finite at the longest length
        assert row["agreement"] == 1.0 and row["max_abs_error"] < 1e-3 and row["finite_at_max_length"] is True
    cells = {(r["engine"], r["batch"], r["length"]) for r in gpu["grid"]}
    assert cells == {(e, b, n) for e in engines for b in (1, 4) for n in (8, 32)}
    assert all(r["p50_ms"] > 0 and r["sequences_per_s"] > 0 for r in gpu["grid"])
    assert "PyTorch fp16" in gpu["not_run"]  # fp16 PyTorch runs on a GPU only, and says so
    assert (out / "gpu.png").is_file() and "GPU table" in (out / "results.md").read_text()
