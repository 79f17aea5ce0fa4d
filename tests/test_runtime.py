"""The lean runtime: no PyTorch underneath, clear errors for bad packages and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from kiln.runtime import load_package, pipeline
from kiln.runtime.errors import InputTooLong, InvalidInput, InvalidInputType, PackageError, ProviderUnavailable

FORBIDDEN = ("torch", "transformers", "optimum")


@pytest.mark.parametrize(
    ("architecture", "task", "call"),
    [
        ("bert", "text-classification", "pipe(['hello world', 'second text'])"),
        ("bert", "token-classification", "pipe(['Alice lives in Seoul'], aggregation_strategy='first')"),
        ("bert", "question-answering", "pipe(['Who?'], ['Alice lives in Seoul'])"),
        ("bert", "feature-extraction", "pipe(['hello world']).tolist()"),
        ("bert", "fill-mask", "pipe(['the [MASK] bank'])"),
    ],
)
def test_runtime_never_imports_torch(exported, architecture, task, call):
    package = exported(architecture, task, "int8")
    code = textwrap.dedent(f"""
        import json, sys
        from kiln.runtime import pipeline
        pipe = pipeline({str(package)!r})
        result = {call}
        print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_generation_never_imports_torch(generator_package):
    for kind in ("gpt2", "t5"):
        code = textwrap.dedent(f"""
            import json, sys
            from kiln.runtime import pipeline
            pipe = pipeline({str(generator_package(kind))!r})
            pipe('red apple', max_new_tokens=4, num_beams=2)
            list(pipe.stream('red apple', max_new_tokens=4, num_beams=1))
            print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})))
        """)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_cli_predict(exported):
    from conftest import run_kiln

    result = run_kiln("predict", str(exported("bert", "text-classification")), "hello", "world", "--compact")
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    assert [a["label"] for a in answers] == [
        a["label"] for a in pipeline(exported("bert", "text-classification"))(["hello", "world"])
    ]


@pytest.mark.parametrize(
    ("texts", "error", "needle"),
    [
        ([], InvalidInput, "empty list"),
        ([""], InvalidInput, "text[0] is empty"),
        ([None], InvalidInputType, "text[0] must be a string, got NoneType"),
        ([42], InvalidInputType, "got int"),
        (None, InvalidInputType, "got NoneType"),
        (["x" * 100_000], InvalidInput, "100000 characters"),
        (["bad \ud800 surrogate"], InvalidInput, "lone surrogate"),
        (["bell \x07 char"], InvalidInput, "control character U+0007"),
    ],
)
def test_bad_input_is_named(exported, texts, error, needle):
    clf = pipeline(exported("bert", "text-classification"))
    with pytest.raises(error, match=None) as raised:
        clf(texts)
    assert needle in str(raised.value)


def test_mismatched_pairs(exported):
    clf = pipeline(exported("bert", "text-classification"))
    with pytest.raises(InvalidInput, match="2 texts but 1 text_pair"):
        clf(["a", "b"], text_pair=["c"])


def test_truncation_is_explicit(exported):
    clf = pipeline(exported("bert", "text-classification"))
    long_text = "word " * 400
    assert clf([long_text])[0]["truncated"] is True
    assert "truncated" not in clf(["short"])[0]
    with pytest.raises(InputTooLong, match="at most 128"):
        clf([long_text], truncation=False)


def test_corrupt_or_newer_package_is_refused(exported, tmp_path):
    import shutil

    package = tmp_path / "pkg"
    shutil.copytree(exported("bert", "text-classification"), package)
    with open(package / "model.onnx", "ab") as handle:
        handle.write(b"junk")
    with pytest.raises(PackageError, match="corrupt file"):
        load_package(package)
    manifest = json.loads((package / "kiln.json").read_text())
    manifest["format_version"] = 99
    (package / "kiln.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match="newer than this kiln"):
        load_package(package)
    (package / "kiln.json").unlink()
    with pytest.raises(PackageError, match=r"no kiln\.json"):
        load_package(package)


def test_absent_provider_fails_loudly(exported):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ProviderUnavailable, match="'cuda' is not available"):
        pipeline(exported("bert", "text-classification"), provider="cuda")
