"""kiln export on tiny local models: every architecture and task, fp32 and int8, through the gate."""

from __future__ import annotations

import json

import numpy as np
import pytest
from kiln.runtime import cpu, pipeline
from kiln.runtime.cpu import int8_cpus_here
from kiln.runtime.errors import PackageError, UnsupportedModel
from kiln.runtime.manifest import read_manifest

MATRIX = [
    ("bert", "text-classification"),
    ("bert", "token-classification"),
    ("bert", "question-answering"),
    ("bert", "feature-extraction"),
    ("bert", "fill-mask"),
    ("roberta", "text-classification"),
    ("roberta", "token-classification"),
    ("distilbert", "text-classification"),
    ("distilbert", "question-answering"),
    ("electra", "token-classification"),
    ("bert", "zero-shot-classification"),
]


@pytest.mark.parametrize("quantize", ["none", "int8"])
@pytest.mark.parametrize(("architecture", "task"), MATRIX)
def test_export_passes_parity(exported, architecture, task, quantize):
    package = exported(architecture, task, quantize)
    manifest = read_manifest(package)
    assert manifest.task == task
    assert manifest.precision == {"none": "fp32", "int8": "int8-dynamic"}[quantize]
    report = manifest.parity
    assert report["passed"] and not report["failures"]
    assert report["batch_sizes"] == [1, 8]
    if task == "feature-extraction":
        assert report["batched"]["min_cosine"] >= (0.9999 if quantize == "none" else 0.99)
    else:
        assert report["batched"]["agreement"] >= 0.99
        assert report["end_to_end"]["agreement"] >= 0.99
    if quantize == "int8":
        assert manifest.quantization["quantized_nodes"] > 0
        assert "MatMulIntegerToFloat" in manifest.quantization["scheme"]
        assert manifest.quantization["batch_invariant"] is True and manifest.max_batch_size == 0
    for name in ("model.onnx", "tokenizer.json", "config.json", "kiln.json"):
        assert (package / name).is_file()


def test_roberta_graph_takes_no_token_type_ids(exported):
    manifest = read_manifest(exported("roberta", "text-classification"))
    assert "token_type_ids" not in manifest.inputs
    assert manifest.max_sequence_length == 128  # 130 positions less RoBERTa's two reserved slots


def test_int8_answers_do_not_depend_on_batch_mates(exported):
    """A text gets exactly the same logits alone or in any padded batch, and int8 packages batch."""
    package = exported("bert", "text-classification", "int8")
    assert read_manifest(package).max_batch_size == 0
    texts = ["short one", "a somewhat longer sentence about the central bank and rates", "세 번째 문장입니다"] * 3
    alone = np.concatenate([pipeline(package).logits([t])[0] for t in texts])
    for batch_size in (1, 2, 9):
        logits, _ = pipeline(package, batch_size=batch_size).logits(texts)
        assert np.array_equal(logits, alone)
    report = read_manifest(package).parity["batch_invariance"]
    assert report["served_one_text_per_call"] is False
    assert report["max_abs"] == 0.0 and report["graph_batched_max_abs"] == 0.0


def test_manifest_records_provenance_and_tolerances(exported, tiny_model):
    manifest = read_manifest(exported("bert", "text-classification", "int8"))
    assert manifest.format_version == 1
    assert manifest.labels == ["politics", "economy", "sports", "science"]
    assert manifest.source["model_id"] == str(tiny_model("bert", "text-classification"))
    assert "model.safetensors" in manifest.source["files"]
    assert {"onnxruntime", "transformers", "torch", "optimum-onnx"} <= set(manifest.tools)
    assert manifest.parity["tolerance"]["min_agreement"] == 0.99
    texts = manifest.parity["texts"]
    assert texts["calibration_items"] > 0 and texts["validation_items"] == manifest.parity["items"]
    assert "held out from calibration" in texts["validation_source"]
    assert manifest.opset == 17


def test_fp16_export_keeps_float_io_and_no_overflow(exported):
    package = exported("bert", "text-classification", "fp16")
    manifest = read_manifest(package)
    assert manifest.precision == "fp16"
    with pytest.raises(PackageError, match="fp16 package runs on a GPU"):
        pipeline(package)
    clf = pipeline(package, allow_fp16_on_cpu=True)
    logits, _ = clf.logits(["word " * 300])  # truncated to the maximum length
    assert logits.dtype == np.float32 and np.isfinite(logits).all()


def test_int8_static_export(tiny_model, tmp_path):
    from kiln.export.build import ExportOptions, export
    from kiln.export.texts import builtin_texts

    calibration = tmp_path / "calibration.txt"
    calibration.write_text("\n".join(builtin_texts()), encoding="utf-8")
    out = tmp_path / "static"
    export(
        ExportOptions(
            model=str(tiny_model("bert", "text-classification")),
            output=out,
            quantize="int8-static",
            calibration=calibration,
            min_agreement=0.9,
        )
    )
    manifest = read_manifest(out)
    assert manifest.precision == "int8-static"
    assert manifest.parity["batch_invariance"]["agreement"] == 1.0


def test_json_output_is_machine_readable(tiny_model, tmp_path):
    from conftest import run_kiln

    out = tmp_path / "pkg"
    result = run_kiln(
        "export", "--model", str(tiny_model("bert", "text-classification")), "--output", str(out), "--json"
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["output"] == str(out)
    assert data["manifest"]["parity"]["passed"] is True
    assert "[  export]" not in result.stderr  # no progress lines with --json


def test_the_gate_validates_on_text_it_did_not_calibrate_on(tiny_model, tmp_path):
    """Calibrated on text A, validated on text B: the figures in kiln.json are B's, and a text of B
    that is also in A is not counted (it would be in-sample)."""
    from kiln.export.build import ExportOptions, export
    from kiln.export.texts import builtin_texts

    texts = builtin_texts()
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n".join(texts[:20]))
    b.write_text("\n".join(texts[15:40]))  # five texts overlap with A
    out = tmp_path / "pkg"
    model = str(tiny_model("bert", "text-classification"))
    export(ExportOptions(model=model, output=out, quantize="int8", calibration=a, validation=b))
    parity = read_manifest(out).parity
    assert parity["texts"] == {
        "calibration_items": 20,
        "validation_items": 20,
        "validation_source": f"{b} (its texts not calibrated on)",
    }
    assert parity["items"] == 20 and parity["batched"]["agreement_lower_95"] < parity["batched"]["agreement"]


def test_the_summary_says_when_int8_kept_most_matmuls_in_float(exported):
    """An int8 package whose ladder returned most MatMuls to float may be no faster than fp32: say so."""
    from dataclasses import replace

    from kiln.export.build import ExportResult
    from kiln.export.cli import summary

    package = exported("bert", "text-classification", "int8")
    manifest = read_manifest(package)
    sizes = {"fp32_onnx": 1, "package_model": 1}
    assert "no faster than fp32" not in summary(ExportResult(package, manifest, sizes))
    mostly_float = {**manifest.quantization, "int8_matmuls": 1, "kept_float": ["a", "b", "c"]}
    text = summary(ExportResult(package, replace(manifest, quantization=mostly_float), sizes))
    assert "kept in float for accuracy: 3 MatMuls" in text and "--calibration FILE" in text


@pytest.mark.skipif(int8_cpus_here() != "vnni", reason="a VNNI package is exported (and gated) on a VNNI CPU")
def test_an_int8_package_for_vnni_cpus_keeps_127_weight_levels_and_refuses_other_cpus(
    tiny_model, tmp_path, monkeypatch
):
    from conftest import run_kiln

    out = tmp_path / "vnni"
    model = str(tiny_model("bert", "text-classification"))
    result = run_kiln("export", "--model", model, "--output", str(out), "--quantize", "int8", "--int8-cpus", "vnni")
    assert result.returncode == 0, result.stderr
    quantization = read_manifest(out).quantization
    assert (quantization["int8_cpus"], quantization["weight_levels"]) == ("vnni", 127)
    assert "127 levels" in quantization["scheme"] and read_manifest(out).parity["passed"]
    pipeline(out)  # loads here
    monkeypatch.setattr(cpu, "_cpuinfo", lambda: {"model name": "AMD EPYC 7B12", "flags": "avx2"})
    with pytest.raises(PackageError, match="--int8-cpus vnni"):
        pipeline(out)


def test_an_int8_package_for_vnni_cpus_is_exported_on_one(tiny_model, tmp_path, monkeypatch):
    """The gate proves a package by running it, so a VNNI package is not exported on an AVX2 machine."""
    from kiln.export.build import ExportOptions, export

    monkeypatch.setattr(cpu, "_cpuinfo", lambda: {"model name": "AMD EPYC 7B12", "flags": "avx2"})
    model = str(tiny_model("bert", "text-classification"))
    with pytest.raises(UnsupportedModel, match=r"--int8-cpus vnni is exported on such a CPU.*AMD EPYC 7B12, avx2"):
        export(ExportOptions(model=model, output=tmp_path / "vnni", quantize="int8", int8_cpus="vnni"))
    assert not (tmp_path / "vnni").exists()


def test_a_validation_file_alone_is_split_to_calibrate_int8_on_its_own_kind_of_text(tmp_path):
    """kiln's built-in sentences are off-topic for most models; a user's --validation text is not, so
    without --calibration int8 calibrates on part of it and the gate validates on the rest, never
    on a text that calibrated. fp32 calibrates nothing and validates on all of it."""
    from kiln.export.texts import CALIBRATION_ITEMS, split_texts

    texts = [f"sentence number {i} about the user's own topic" for i in range(200)]
    path = tmp_path / "traffic.txt"
    path.write_text("\n".join(texts))
    split = split_texts(None, path, 400, calibrates=True)
    assert len(split.calibration) == CALIBRATION_ITEMS and len(split.validation) == 200 - CALIBRATION_ITEMS
    assert not set(split.calibration) & set(split.validation) and set(split.calibration) <= set(texts)
    assert split.source == f"{path}, held out from calibration"
    assert split_texts(None, path, 400, calibrates=False).validation == texts
