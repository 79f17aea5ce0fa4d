"""Bad input to `kiln export`: a one-line error naming the problem, a non-zero exit, nothing left behind."""

from __future__ import annotations

import json
import os

import pytest
from conftest import run_kiln
from kiln.runtime.errors import (
    CalibrationError,
    ModelNotFound,
    NotAModel,
    OutputError,
    ParityError,
    UnsupportedModel,
)


def _assert_clean_failure(result, error, needle: str, parent):
    assert result.returncode == error.exit_code, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("kiln export: error:") and needle in last, result.stderr
    assert "Traceback" not in result.stderr
    leftovers = [p.name for p in parent.iterdir() if p.name.startswith(".")]
    assert leftovers == [], f"half-written files left behind: {leftovers}"


def test_unknown_hub_id_offline(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = run_kiln("export", "--model", "nobody/no-such-model", "--output", str(tmp_path / "out"), env=env)
    _assert_clean_failure(result, ModelNotFound, "not in the Hugging Face cache", tmp_path)


def test_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_kiln("export", "--model", str(tmp_path / "empty"), "--output", str(tmp_path / "out"))
    _assert_clean_failure(result, NotAModel, "no config.json", tmp_path)


def test_missing_weights(tmp_path):
    model = tmp_path / "noweights"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "bert"}))
    result = run_kiln("export", "--model", str(model), "--output", str(tmp_path / "out"))
    _assert_clean_failure(result, NotAModel, "no model weights", tmp_path)


def test_unsupported_architecture(tmp_path):
    model = tmp_path / "mamba"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "mamba", "architectures": ["MambaForCausalLM"]}))
    (model / "model.safetensors").write_bytes(b"")
    result = run_kiln("export", "--model", str(model), "--output", str(tmp_path / "out"))
    _assert_clean_failure(result, UnsupportedModel, "architecture 'mamba' is not supported", tmp_path)


def test_a_generator_task_for_an_encoder_is_refused(tiny_model, tmp_path):
    model = tiny_model("bert", "text-classification")
    result = run_kiln("export", "--model", str(model), "--task", "summarization", "--output", str(tmp_path / "out"))
    _assert_clean_failure(result, UnsupportedModel, "summarization needs a generator", tmp_path)


def test_task_that_does_not_match_the_head(tiny_model, tmp_path):
    model = tiny_model("bert", "text-classification")
    result = run_kiln(
        "export", "--model", str(model), "--task", "token-classification", "--output", str(tmp_path / "out")
    )
    _assert_clean_failure(result, UnsupportedModel, "does not match the model's head", tmp_path)


def test_unknown_task(tiny_model, tmp_path):
    result = run_kiln(
        "export",
        "--model",
        str(tiny_model("bert", "text-classification")),
        "--task",
        "summarize",
        "--output",
        str(tmp_path / "out"),
    )
    _assert_clean_failure(result, UnsupportedModel, "task 'summarize' is not supported", tmp_path)


def test_existing_output_without_force(tiny_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_kiln("export", "--model", str(tiny_model("bert", "text-classification")), "--output", str(out))
    _assert_clean_failure(result, OutputError, "already exists; pass --force", tmp_path)
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_as_user(tiny_model, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    result = run_kiln(
        "export", "--model", str(tiny_model("bert", "text-classification")), "--output", str(locked / "out")
    )
    assert result.returncode == OutputError.exit_code


def test_unwritable_output(tiny_model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    result = run_kiln(
        "export", "--model", str(tiny_model("bert", "text-classification")), "--output", str(blocker / "out")
    )
    _assert_clean_failure(result, OutputError, "cannot write to", tmp_path)


@pytest.mark.parametrize("content", [None, "", "\n  \n"])
def test_missing_or_empty_calibration(tiny_model, tmp_path, content):
    calibration = tmp_path / "calibration.txt"
    if content is not None:
        calibration.write_text(content)
    result = run_kiln(
        "export",
        "--model",
        str(tiny_model("bert", "text-classification")),
        "--quantize",
        "int8-static",
        "--calibration",
        str(calibration),
        "--output",
        str(tmp_path / "out"),
    )
    needle = "does not exist" if content is None else "is empty"
    _assert_clean_failure(result, CalibrationError, needle, tmp_path)


def test_max_length_over_the_model_limit(tiny_model, tmp_path):
    result = run_kiln(
        "export",
        "--model",
        str(tiny_model("bert", "text-classification")),
        "--max-length",
        "4096",
        "--output",
        str(tmp_path / "out"),
    )
    _assert_clean_failure(result, UnsupportedModel, "over the model's limit of 128", tmp_path)


def test_gate_fails_a_broken_export(tiny_model, tmp_path, monkeypatch):
    """Corrupt the graph after export (as a buggy optimiser would): the gate must refuse it."""
    import onnx
    from kiln.export import build
    from kiln.export.build import ExportOptions, export
    from onnx import numpy_helper

    real = build.export_onnx

    def broken_export(*args, **kwargs):
        path = real(*args, **kwargs)
        model = onnx.load(str(path))
        for init in model.graph.initializer:
            if "classifier" in init.name and init.name.endswith("weight"):
                init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), init.name))
        onnx.save(model, str(path))
        return path

    monkeypatch.setattr(build, "export_onnx", broken_export)
    out = tmp_path / "out"
    with pytest.raises(ParityError) as failure:
        export(ExportOptions(model=str(tiny_model("bert", "text-classification")), output=out))
    assert "parity gate failed" in str(failure.value)
    assert failure.value.report["passed"] is False
    assert not out.exists()
    assert [p for p in tmp_path.iterdir()] == []
