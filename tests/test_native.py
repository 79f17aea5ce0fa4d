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
from kiln.export import row_quantize, self_attention, skip_layer_norm
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


def _quantisers(tmp_path: Path, k: int, definition: int, opset: int = 17) -> Path:
    """x[rows, k] -> RowQuantize(x) and RowQuantizeSmoothed(x, factors) (or their second definition,
    RowQuantize2..., and with it the one-sided RowQuantizeShifted2(x, factors, shift)): every form,
    two outputs each."""
    rng = np.random.default_rng(0)
    factors = rng.uniform(0.05, 20, k).astype(np.float32)
    shift = (np.float32(0.17) * factors * rng.uniform(0.5, 2, k)).astype(np.float32)
    forms = [("", None, None), ("_s", "unsmooth", None)]
    if definition == 2:
        forms.append(("_h", "unsmooth", "shift"))
    nodes = [
        row_quantize.quantize_node("x", unsmooth, f"q{tag}", f"peak{tag}", f"form{tag}", definition, shift)
        for tag, unsmooth, shift in forms
    ]
    outputs = [
        (f"{name}{tag}", kind)
        for tag, _, _ in forms
        for name, kind in [("q", TensorProto.UINT8), ("peak", TensorProto.FLOAT)]
    ]
    graph = helper.make_graph(
        nodes,
        "quantisers",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k])],
        [helper.make_tensor_value_info(name, kind, None) for name, kind in outputs],
        [numpy_helper.from_array(factors, "unsmooth"), numpy_helper.from_array(shift, "shift")],
    )
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets, functions=row_quantize.functions(opset, definition))
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
@pytest.mark.parametrize("definition", [1, 2])
def test_every_form_of_row_quantize_gives_the_standard_ops_bits(tmp_path, monkeypatch, isa, k, definition):
    """The C kernel's forms (portable, AVX2, AVX-512: the best the CPU has) against onnxruntime
    running the op's definition, bit for bit, for widths with and without a vector tail, in both
    definitions (packages made before 2026-12-05 carry the first). 64 rows of 1536 run on the thread
    pool (the kernel splits calls of 65,536 values and more), 64 of 384 and 37 on one thread."""
    if isa != "best":
        monkeypatch.setenv("KILN_ROW_QUANTIZE_ISA", isa)
    path, x = _quantisers(tmp_path, k, definition), _hard_rows(k)
    native = create_session(path, SessionOptions(native_kernels=True))
    standard = create_session(path, SessionOptions(native_kernels=False))
    for got, want in zip(native.run(None, {"x": x}), standard.run(None, {"x": x}), strict=True):
        assert got.dtype == want.dtype and np.array_equal(got, want, equal_nan=True)
    assert _ops_run(path, x)[DOMAIN] == 1 + definition  # the comparison was not the standard ops against themselves


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


def test_the_second_definition_changes_codes_only_at_rounding_ties(tmp_path):
    """x * (127 / peak) against (x / peak) / (1 / 127): one level apart at most, and rarely."""
    x = np.random.default_rng(2).normal(size=(256, 384)).astype(np.float32)
    first, second = (
        create_session(_quantisers(tmp_path, 384, definition), SessionOptions(native_kernels=False)).run(None, {"x": x})
        for definition in (1, 2)
    )
    assert np.array_equal(first[1], second[1])  # the peaks
    moved = np.abs(first[0].astype(int) - second[0].astype(int))
    assert moved.max() <= 1 and moved.mean() < 1e-3  # none moved on these 98,304 values


def _attention(tmp_path: Path, heads: int, head_size: int, opset: int = 17) -> Path:
    """qkv[B, S, 3 D], key lengths[B] -> ai.kiln.SelfAttention, as an int8 graph carries it."""
    width = heads * head_size
    bias = np.random.default_rng(3).normal(size=3 * width).astype(np.float32)
    node = helper.make_node(self_attention.SELF_ATTENTION, ["qkv", "bias", "lengths"], ["y"], domain=DOMAIN)
    node.attribute.extend(
        [helper.make_attribute("num_heads", heads), helper.make_attribute("mask_filter_value", -3.4028234663852886e38)]
    )
    graph = helper.make_graph(
        [node],
        "attention",
        [
            helper.make_tensor_value_info("qkv", TensorProto.FLOAT, ["batch", "seq", 3 * width]),
            helper.make_tensor_value_info("lengths", TensorProto.INT32, ["batch"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", width])],
        [numpy_helper.from_array(bias, "bias")],
    )
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, 1), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, functions=[self_attention.function(opset)])
    path = tmp_path / f"attention-{heads}x{head_size}-{opset}.onnx"
    onnx.save(model, str(path))
    return path


def _qkv(batch: int, seq: int, width: int, seed: int = 4) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(batch, seq, 3 * width)) * 2).astype(np.float32)


@pytest.mark.skipif(kernels_library() is None, reason="kiln's kernels library is not built here")
@pytest.mark.parametrize(("heads", "head_size", "opset"), [(12, 32, 17), (12, 64, 17), (4, 24, 18), (2, 8, 14)])
def test_self_attention_answers_as_its_definition(tmp_path, heads, head_size, opset):
    """The kernel against onnxruntime's Split + MultiHeadAttention on the same inputs: equal to float
    rounding, for head sizes that are and are not whole vectors, texts of every length in one batch."""
    path, qkv = _attention(tmp_path, heads, head_size, opset), _qkv(5, 37, heads * head_size)
    lengths = np.array([37, 1, 16, 17, 30], dtype=np.int32)
    got = create_session(path, SessionOptions(native_kernels=True)).run(None, {"qkv": qkv, "lengths": lengths})[0]
    want = create_session(path, SessionOptions(native_kernels=False)).run(None, {"qkv": qkv, "lengths": lengths})[0]
    assert np.abs(got - want).max() < 2e-5 * np.abs(want).max()
    assert _attention_ops_run(path, qkv, lengths) == 1  # the comparison was not the definition against itself


@pytest.mark.skipif(kernels_library() is None, reason="kiln's kernels library is not built here")
def test_self_attention_gives_a_text_the_same_bits_alone_and_in_any_batch(tmp_path):
    """A text's rows depend on its own keys only: the same bits alone, padded among others, and in a
    batch large enough to run on onnxruntime's thread pool."""
    path = _attention(tmp_path, 12, 32)
    session = create_session(path, SessionOptions(native_kernels=True))
    text = _qkv(1, 21, 384, seed=5)
    alone = session.run(None, {"qkv": text, "lengths": np.array([21], dtype=np.int32)})[0]
    for batch, seq in [(3, 40), (64, 64)]:
        qkv = _qkv(batch, seq, 384, seed=6)
        qkv[1, :21] = text[0]
        lengths = np.full(batch, seq, dtype=np.int32)
        lengths[1] = 21
        batched = session.run(None, {"qkv": qkv, "lengths": lengths})[0]
        assert np.array_equal(batched[1, :21], alone[0])


@pytest.mark.skipif(kernels_library() is None, reason="kiln's kernels library is not built here")
def test_self_attention_forms_agree(tmp_path, monkeypatch):
    """AVX2 and AVX-512 run one C body with the same operations lane by lane: the same bits. The
    portable form has no fused multiply-add: float rounding apart."""
    path, qkv, lengths = _attention(tmp_path, 12, 32), _qkv(4, 33, 384), np.array([33, 9, 20, 2], dtype=np.int32)
    runs = {}
    for isa in ("best", "avx2", "plain"):
        monkeypatch.setenv("KILN_ATTENTION_ISA", isa)
        runs[isa] = create_session(path, SessionOptions()).run(None, {"qkv": qkv, "lengths": lengths})[0]
    if platform.machine() == "x86_64":
        assert np.array_equal(runs["best"], runs["avx2"])
    assert np.abs(runs["plain"] - runs["best"]).max() < 2e-5 * np.abs(runs["best"]).max()


@pytest.mark.skipif(kernels_library() is None, reason="kiln's kernels library is not built here")
def test_self_attention_refuses_inputs_that_do_not_fit_together(tmp_path):
    """Key lengths for another batch size: an error naming the shapes, not a read past the tensor."""
    import onnxruntime as ort

    session = create_session(_attention(tmp_path, 12, 32), SessionOptions())
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match=r"key lengths \[batch\]"):
        session.run(None, {"qkv": _qkv(2, 9, 384), "lengths": np.array([9, 4, 1], dtype=np.int32)})


def _attention_ops_run(path: Path, qkv: np.ndarray, lengths: np.ndarray) -> int:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling, options.profile_file_prefix = True, str(path.with_name("profile"))
    options.register_custom_ops_library(str(kernels_library()))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session.run(None, {"qkv": qkv, "lengths": lengths})
    events = json.loads(Path(session.end_profiling()).read_text())
    ran = [e["args"]["op_name"] for e in events if e.get("cat") == "Node" and "op_name" in e.get("args", {})]
    assert "MultiHeadAttention" not in ran
    return ran.count(self_attention.SELF_ATTENTION)


def _skip_layer_norm(tmp_path: Path, k: int, epsilon: float = 1e-12) -> Path:
    """x[..., k] (+ bias) + skip[..., k] -> LayerNormalization, as an encoder's int8 graph has it,
    fused by the export's rewrite (which must find the pattern: one op, with its definition)."""
    rng = np.random.default_rng(7)
    vectors = {"bias": rng.normal(size=k), "gamma": 1 + rng.normal(size=k) / 4, "beta": rng.normal(size=k) / 4}
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["bias", "x"], ["biased"], name="bias"),
            helper.make_node("Add", ["skip", "biased"], ["sum"], name="residual"),
            helper.make_node(
                "LayerNormalization", ["sum", "gamma", "beta"], ["y"], axis=-1, epsilon=epsilon, name="ln"
            ),
        ],
        "skip_layer_norm",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "seq", k]) for n in ("x", "skip")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", k])],
        [numpy_helper.from_array(v.astype(np.float32), name) for name, v in vectors.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    assert skip_layer_norm.fuse(model, 17) == 1
    assert [n.op_type for n in model.graph.node] == [skip_layer_norm.SKIP_LAYER_NORM]
    path = tmp_path / f"skip-layer-norm-{k}.onnx"
    onnx.save(model, str(path))
    return path


def _residuals(batch: int, seq: int, k: int, seed: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, seq, k)) * 3
    x[..., 5] += 40  # an outlier channel, as after BERT's attention output
    return {"x": x.astype(np.float32), "skip": rng.normal(size=(batch, seq, k)).astype(np.float32)}


@pytest.mark.skipif(kernels_library() is None, reason="kiln's kernels library is not built here")
@pytest.mark.parametrize("k", [384, 768, 100, 7])
def test_skip_layer_norm_answers_as_its_definition(tmp_path, k):
    """The kernel against onnxruntime's Add, Add and LayerNormalization on the same inputs: equal to
    float rounding, for widths that are and are not whole vectors."""
    path, feeds = _skip_layer_norm(tmp_path, k), _residuals(3, 19, k)
    got = create_session(path, SessionOptions(native_kernels=True)).run(None, feeds)[0]
    want = create_session(path, SessionOptions(native_kernels=False)).run(None, feeds)[0]
    assert not np.array_equal(got, want)  # two implementations ran, not the definition twice
    assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()


@pytest.mark.skipif(kernels_library() is None, reason="kiln's kernels library is not built here")
def test_skip_layer_norm_gives_a_row_the_same_bits_in_every_batch_and_form(tmp_path, monkeypatch):
    """Rows are independent: a text's rows are the same bits alone and in a batch large enough for
    onnxruntime's thread pool; AVX-512, AVX2 and portable C sum in the same 16 lanes: the same bits."""
    path, text = _skip_layer_norm(tmp_path, 384), _residuals(1, 21, 384, seed=9)
    runs = {}
    for isa in ("best", "avx2", "plain"):
        monkeypatch.setenv("KILN_LAYER_NORM_ISA", isa)
        session = create_session(path, SessionOptions())
        alone = session.run(None, text)[0]
        batch = _residuals(64, 24, 384, seed=10)
        for name in batch:
            batch[name][7, :21] = text[name][0]
        assert np.array_equal(session.run(None, batch)[0][7, :21], alone[0])
        runs[isa] = alone
    assert np.array_equal(runs["best"], runs["avx2"]) and np.array_equal(runs["best"], runs["plain"])


@pytest.mark.skipif(kernels_library() is None, reason="kiln's kernels library is not built here")
def test_skip_layer_norm_refuses_inputs_that_do_not_fit_together(tmp_path):
    """A residual of another shape: an error naming the shapes, not a read past the tensor."""
    import onnxruntime as ort

    session = create_session(_skip_layer_norm(tmp_path, 384), SessionOptions())
    feeds = _residuals(2, 9, 384)
    feeds["skip"] = feeds["skip"][:, :5]
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match="x and skip must have one shape"):
        session.run(None, feeds)


@pytest.mark.parametrize(("bias_width", "outputs"), [(8, ("y", "sum")), (1, ("y",))])
def test_skip_layer_norm_leaves_a_sum_that_others_read(bias_width, outputs):
    """The residual's sum read elsewhere too (a graph output here), or a bias that broadcasts (one
    value): left apart."""
    k = 8
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["x", "bias"], ["biased"], name="bias"),
            helper.make_node("Add", ["biased", "skip"], ["sum"], name="residual"),
            helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["y"], axis=-1, name="ln"),
        ],
        "left_apart",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, k]) for n in ("x", "skip")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, k]) for n in outputs],
        [
            numpy_helper.from_array(np.ones(width, dtype=np.float32), n)
            for n, width in (("bias", bias_width), ("gamma", k), ("beta", k))
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert skip_layer_norm.fuse(model, 17) == 0
    assert len(model.graph.node) == 3 and not model.functions


def test_an_int8_package_answers_alike_with_and_without_kilns_kernels(exported, monkeypatch):
    """Without the library onnxruntime runs the ops' definitions: the quantiser's bits, attention's answers
    to float rounding. The export checked it on its calibration items; here on text."""
    package = exported("bert", "text-classification", "int8")
    quantization = read_manifest(package).quantization
    checked = quantization["native_kernels"]
    if kernels_library() is None:
        assert checked.startswith("not checked")
        return
    assert quantization["self_attentions"] == 2 and quantization["skip_layer_norms"] == 4
    assert checked["score_without"] >= 0.99 and checked["max_difference"] < 0.05
    texts = ["Alice lives in Seoul", "The markets fell sharply today, and then rose", "경기는 연장전 끝에 끝났다"]
    with_kernels = pipeline(package).logits(texts)[0]
    monkeypatch.setenv("KILN_NATIVE_KERNELS", "0")
    without = pipeline(package).logits(texts)[0]
    assert np.array_equal(without.argmax(-1), with_kernels.argmax(-1))
    assert np.abs(without - with_kernels).max() < 0.05
