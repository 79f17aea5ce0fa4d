"""kiln's own onnxruntime kernels (kiln.runtime.native): built with the package, run where they
are, and the same bits as the standard ops they stand for, on every instruction set this CPU has."""

from __future__ import annotations

import json
import platform
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from kiln.export import row_quantize
from kiln.runtime import pipeline
from kiln.runtime.manifest import read_manifest
from kiln.runtime.native import DOMAIN, kernels_library
from kiln.runtime.session import SessionOptions, create_session
from onnx import TensorProto, helper, numpy_helper

BUILT_FOR = {("Linux", "x86_64"), ("Linux", "aarch64")}


@pytest.mark.skipif((platform.system(), platform.machine()) not in BUILT_FOR, reason="the wheel builds them on Linux")
def test_the_kernels_are_built_with_the_package():
    library = kernels_library()
    assert library is not None and library.is_file(), "reinstall (make install) to build runtime/native"


def test_kiln_native_kernels_0_turns_them_off(monkeypatch):
    monkeypatch.setenv("KILN_NATIVE_KERNELS", "0")
    assert kernels_library() is None


def _quantisers(tmp_path: Path, k: int, opset: int = 17) -> Path:
    """x[rows, k] -> RowQuantize(x) and RowQuantizeSmoothed(x, factors): both forms, four outputs."""
    factors = np.random.default_rng(0).uniform(0.05, 20, k).astype(np.float32)
    nodes = [
        row_quantize.quantize_node("x", None, "q", "peak", "plain"),
        row_quantize.quantize_node("x", "unsmooth", "q_s", "peak_s", "smoothed"),
    ]
    outputs = [("q", TensorProto.UINT8), ("peak", TensorProto.FLOAT), ("q_s", TensorProto.UINT8)]
    graph = helper.make_graph(
        nodes,
        "quantisers",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k])],
        [helper.make_tensor_value_info(name, kind, None) for name, kind in [*outputs, ("peak_s", TensorProto.FLOAT)]],
        [numpy_helper.from_array(factors, "unsmooth")],
    )
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets, functions=row_quantize.functions(opset))
    path = tmp_path / "quantisers.onnx"
    onnx.save(model, str(path))
    return path


def _hard_rows(k: int) -> np.ndarray:
    """Rows a kernel can get wrong: outliers, ties between levels, tiny and huge values, an all-zero row."""
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(64, k)).astype(np.float32) * rng.uniform(1e-3, 1e3, (64, 1)).astype(np.float32)
    rows[1, 3] = 500.0  # an outlier row
    rows[2] = np.arange(k, dtype=np.float32) % 255 - 127  # peak 127: x / peak * 127 = x, ties at .5 below
    rows[3] = (np.arange(k, dtype=np.float32) % 255 - 127) + 0.5
    rows[4] = 0.0
    rows[5] = -0.0
    rows[6, : k // 2] = 1e-38  # subnormal neighbours
    return rows


@pytest.mark.skipif(kernels_library() is None, reason="kiln's kernels library is not built here")
@pytest.mark.parametrize("isa", ["plain", "avx2", "best"])
@pytest.mark.parametrize("k", [384, 1536, 37])
def test_every_form_of_row_quantize_gives_the_standard_ops_bits(tmp_path, monkeypatch, isa, k):
    """The C kernel's forms (portable, AVX2, AVX-512: the best the CPU has) against onnxruntime
    running the op's definition, bit for bit, for widths with and without a vector tail."""
    if isa != "best":
        monkeypatch.setenv("KILN_ROW_QUANTIZE_ISA", isa)
    path, x = _quantisers(tmp_path, k), _hard_rows(k)
    native = create_session(path, SessionOptions(native_kernels=True))
    standard = create_session(path, SessionOptions(native_kernels=False))
    for got, want in zip(native.run(None, {"x": x}), standard.run(None, {"x": x}), strict=True):
        assert got.dtype == want.dtype and np.array_equal(got, want, equal_nan=True)
    assert _ops_run(path, x)[DOMAIN] == 2  # the comparison was not the standard ops against themselves


def _ops_run(path: Path, x: np.ndarray) -> Counter:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling, options.profile_file_prefix = True, str(path.with_name("profile"))
    options.register_custom_ops_library(str(kernels_library()))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session.run(None, {"x": x})
    events = json.loads(Path(session.end_profiling()).read_text())
    ran = [e["args"]["op_name"] for e in events if e.get("cat") == "Node" and "op_name" in e.get("args", {})]
    return Counter(DOMAIN if name.startswith("RowQuantize") else name for name in ran)


def test_an_int8_package_answers_the_same_bits_with_and_without_kilns_kernels(exported, monkeypatch):
    package = exported("bert", "text-classification", "int8")
    checked = read_manifest(package).quantization["native_kernels"]
    assert checked.startswith("the same bits" if kernels_library() else "not checked")
    texts = ["Alice lives in Seoul", "The markets fell sharply today, and then rose", "경기는 연장전 끝에 끝났다"]
    with_kernels = pipeline(package).logits(texts)[0]
    monkeypatch.setenv("KILN_NATIVE_KERNELS", "0")
    assert np.array_equal(pipeline(package).logits(texts)[0], with_kernels)
