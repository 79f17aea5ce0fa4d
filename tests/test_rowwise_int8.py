"""kiln's int8 MatMul (kiln.export.rowwise_int8) on small graphs run by onnxruntime: it computes the
per-row scheme exactly, a row's output does not depend on the other rows, and the int32 sums never
saturate, whatever the kernel."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from kiln.export.activation_stats import ActivationStats
from kiln.export.rowwise_int8 import (
    LEVELS,
    SWITCH,
    WEIGHT_LEVELS,
    Calibrated,
    Rewrite,
    quantize_rows,
    smoothing_factors,
)
from kiln.runtime.cpu import INT8_CPUS, int8_cpus_here, int8_kernel
from kiln.runtime.errors import UnsupportedModel
from kiln.runtime.native import kernels_library
from kiln.runtime.session import SessionOptions, create_session
from onnx import TensorProto, helper, numpy_helper

K, N = 96, 48


def _graph(tmp_path: Path, weights: dict[str, np.ndarray], reads: dict[str, str]) -> Path:
    """x[batch, rows, K] -> one MatMul per weight (reading x, or another MatMul's output) -> outputs."""
    nodes = [helper.make_node("MatMul", [reads[name], f"{name}.w"], [name], name=name) for name in weights]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "rows", K])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in weights],
        [numpy_helper.from_array(w.astype(np.float32), f"{name}.w") for name, w in weights.items()],
    )
    path = tmp_path / "float.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _run(path: Path, x: np.ndarray, **flags: np.ndarray) -> list[np.ndarray]:
    """The graph's outputs from its standard ops, checked bit for bit against kiln's kernels."""
    standard = create_session(path, SessionOptions(native_kernels=False)).run(None, {"x": x, **flags})
    if kernels_library() is not None:
        native = create_session(path, SessionOptions()).run(None, {"x": x, **flags})
        assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(standard, native, strict=True))
    return standard


def _scheme(x: np.ndarray, w: np.ndarray, weight_levels: int = WEIGHT_LEVELS) -> np.ndarray:
    """The scheme in numpy: per-row activation scale, per-column weight scale, exact integer sums."""
    peak = np.abs(x).max(axis=-1, keepdims=True)
    q = np.round(x * (np.float32(LEVELS) / peak)).astype(np.int32)  # numpy rounds half to even, as QuantizeLinear
    column = (np.abs(w).max(axis=0) / weight_levels).astype(np.float32)
    w8 = np.clip(np.round(w / column), -weight_levels, weight_levels).astype(np.int32)
    return (q @ w8).astype(np.float32) * (column / np.float32(LEVELS)) * peak


def test_the_graph_computes_the_per_row_scheme(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(K, N)).astype(np.float32)
    x = rng.normal(size=(2, 5, K)).astype(np.float32)
    x[0, 1, 7] = 40.0  # an outlier widens its own row's scale, no other row's
    quantized = tmp_path / "int8.onnx"
    assert quantize_rows(_graph(tmp_path, {"proj": w}, {"proj": "x"}), quantized, set()) == Rewrite(["proj"], [])
    (got,) = _run(quantized, x)
    np.testing.assert_allclose(got, _scheme(x, w), rtol=1e-6, atol=1e-6)
    error = np.abs(got - x @ w) / np.abs(x @ w).max(axis=-1, keepdims=True)
    assert error[0, 0].max() < 0.02 and error[0, 1].max() < 0.05  # the outlier's row rounds coarser


def test_a_row_gets_the_same_bits_alone_and_next_to_any_rows(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(K, N)).astype(np.float32)
    quantized = tmp_path / "int8.onnx"
    quantize_rows(_graph(tmp_path, {"proj": w}, {"proj": "x"}), quantized, set())
    session = ort.InferenceSession(str(quantized), providers=["CPUExecutionProvider"])
    rows = rng.normal(size=(70, K)).astype(np.float32) * rng.uniform(0.01, 50, size=(70, 1)).astype(np.float32)
    rows[3] = 0.0  # an all-zero row: its NaN codes are multiplied by its peak, 0, so its outputs are zeros
    alone = np.stack([session.run(None, {"x": row[None, None]})[0][0, 0] for row in rows])
    assert np.isfinite(alone).all() and not alone[3].any()
    for count in (2, 3, 7, 16, 33, 70):  # kernels tile M in blocks; no tiling may change a row
        together = session.run(None, {"x": rows[None, :count]})[0][0]
        assert np.array_equal(together, alone[:count])
    batched = session.run(None, {"x": rows.reshape(7, 10, K)})[0].reshape(70, N)
    assert np.array_equal(batched, alone)


def test_int32_sums_are_exact_at_the_largest_values(tmp_path):
    """u8 x s8 kernels without VNNI add product pairs in int16; 63 weight levels keep them below its
    saturation (255 * 63 * 2 = 32130), so the extreme case still equals the exact integer result."""
    w = np.where(np.arange(K)[:, None] % 2 == 0, 1.0, -1.0) * np.ones((K, N), np.float32)
    w[:, 1] = 1.0
    x = np.ones((1, 2, K), np.float32)
    x[0, 1, ::2] = -1.0
    quantized = tmp_path / "int8.onnx"
    quantize_rows(_graph(tmp_path, {"proj": w}, {"proj": "x"}), quantized, set())
    (got,) = _run(quantized, x)
    np.testing.assert_allclose(got, x @ w, rtol=1e-6, atol=1e-5)


@pytest.mark.skipif(int8_cpus_here() != "vnni", reason=f"this CPU's int8 kernel ({int8_kernel()}) sums in int16")
def test_vnni_packages_keep_127_weight_levels_and_exact_sums_where_the_cpu_sums_in_int32(tmp_path):
    """`--int8-cpus vnni`: 127 weight levels a side, twice as fine; on a CPU that sums u8 x s8 in
    int32 even the largest products (255 * 127, four to a lane) add up exactly."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(K, N)).astype(np.float32)
    w[:, 0] = np.where(np.arange(K) % 2 == 0, 1.0, -1.0)  # the extreme column: every product at its peak
    x = rng.normal(size=(2, 6, K)).astype(np.float32)
    x[0, 0] = np.where(np.arange(K) % 2 == 0, 1.0, -1.0)
    source, fine, coarse = _graph(tmp_path, {"proj": w}, {"proj": "x"}), tmp_path / "127.onnx", tmp_path / "63.onnx"
    quantize_rows(source, fine, set(), calibrated=Calibrated({}, weight_levels=INT8_CPUS["vnni"]))
    quantize_rows(source, coarse, set())
    levels = {init.name: numpy_helper.to_array(init) for init in onnx.load(str(fine)).graph.initializer}
    assert np.abs(levels["proj.int8.weight"]).max() == 127
    (got,) = _run(fine, x)
    np.testing.assert_allclose(got, _scheme(x, w, weight_levels=127), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[0, 0, 0], K, rtol=1e-6)  # 96 products of 127 * 127 (the zero point's 128 + 127)
    many = rng.normal(size=(4, 128, K)).astype(np.float32)  # large enough for AMX's tiles, where it has them
    np.testing.assert_allclose(_run(fine, many)[0], _scheme(many, w, weight_levels=127), rtol=1e-6, atol=1e-6)
    error = {path.stem: np.abs(_run(path, x)[0] - x @ w).mean() for path in (fine, coarse)}
    assert error["127"] < 0.8 * error["63"]  # the weights round half as coarsely; the activations as before


def test_readers_of_one_activation_share_its_quantisation_and_one_gemm_and_kept_matmuls_stay_float(tmp_path):
    rng = np.random.default_rng(2)
    weights = {name: rng.normal(size=(K, K)).astype(np.float32) for name in ("q", "k", "v", "head")}
    reads = {"q": "x", "k": "x", "v": "x", "head": "q"}
    quantized = tmp_path / "int8.onnx"
    assert quantize_rows(_graph(tmp_path, weights, reads), quantized, {"head"}) == Rewrite(["k", "q", "v"], ["head"])
    ops = Counter(node.op_type for node in onnx.load(str(quantized)).graph.node)
    assert ops["RowQuantize2"] == 1 and ops["MatMulIntegerToFloat"] == 1 and ops["Split"] == 1 and ops["MatMul"] == 1
    x = rng.normal(size=(1, 4, K)).astype(np.float32)
    for got, name in zip(_run(quantized, x)[:3], ("q", "k", "v"), strict=True):
        np.testing.assert_allclose(got, _scheme(x, weights[name]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("opset", [13, 17, 18, 21])
def test_every_opset_from_13_gets_the_same_bits(tmp_path, opset):
    """ReduceMax took its axes as an attribute until opset 18 and as an input since."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(K, N)).astype(np.float32)
    source = _graph(tmp_path, {"proj": w}, {"proj": "x"})
    model = onnx.load(str(source))
    model.opset_import[0].version = opset
    onnx.save(model, str(source))
    quantized = tmp_path / "int8.onnx"
    quantize_rows(source, quantized, set())
    x = rng.normal(size=(1, 6, K)).astype(np.float32)
    np.testing.assert_allclose(_run(quantized, x)[0], _scheme(x, w), rtol=1e-6, atol=1e-6)


def test_a_graph_older_than_opset_13_is_refused_by_name(tmp_path):
    source = _graph(tmp_path, {"proj": np.ones((K, N), np.float32)}, {"proj": "x"})
    model = onnx.load(str(source))
    model.opset_import[0].version = 12
    onnx.save(model, str(source))
    with pytest.raises(UnsupportedModel, match="opset 13"):
        quantize_rows(source, tmp_path / "int8.onnx", set())


@pytest.mark.parametrize("depth", [8, 15])
def test_too_narrow_matmuls_stay_float(tmp_path, depth):
    quantized = tmp_path / "int8.onnx"
    source = _graph(tmp_path, {"proj": np.ones((K, N), np.float32)}, {"proj": "x"})
    model = onnx.load(str(source))
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ones((depth, N), np.float32), "proj.w"))
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = depth
    onnx.save(model, str(source))
    assert quantize_rows(source, quantized, set()) == Rewrite([], ["proj"])


def test_a_switched_graph_runs_each_group_in_int8_or_float_as_its_input_says(tmp_path):
    """The export's ladder measures any mix of int8 and float groups in one session."""
    rng = np.random.default_rng(4)
    weights = {name: rng.normal(size=(K, K)).astype(np.float32) for name in ("q", "k", "v", "out")}
    reads = {"q": "x", "k": "x", "v": "x", "out": "q"}
    source = _graph(tmp_path, weights, reads)
    int8, switched = tmp_path / "int8.onnx", tmp_path / "switched.onnx"
    quantize_rows(source, int8, set())
    quantize_rows(source, switched, set(), switched=True)
    session = ort.InferenceSession(str(switched), providers=["CPUExecutionProvider"])
    flags = sorted(i.name for i in session.get_inputs() if i.name.startswith(SWITCH))
    assert flags == [SWITCH + "q", SWITCH + "x"]
    x = rng.normal(size=(1, 4, K)).astype(np.float32)

    def run(int8: set[str]) -> list[np.ndarray]:
        return _run(switched, x, **{f: np.array(f in int8) for f in flags})

    for got, want in zip(run(set(flags)), _run(int8, x), strict=True):
        assert np.array_equal(got, want)
    for got, want in zip(run(set()), _run(source, x), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    q, _, _, out = run({SWITCH + "q"})  # Q/K/V in float, the MatMul reading q in int8
    np.testing.assert_allclose(q, x @ weights["q"], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out, _scheme(q, weights["out"]), rtol=1e-6, atol=1e-6)


def test_an_outlier_channel_is_smoothed_into_the_weight(tmp_path):
    """A channel that runs 40x the rest on every token (as after LayerNorm) would leave the others a
    few levels; calibration peaks move it into the weight (x / s times s * W), and the error drops."""
    rng = np.random.default_rng(5)
    w = rng.normal(size=(K, N)).astype(np.float32)
    x = rng.normal(size=(1, 32, K)).astype(np.float32)
    x[..., 7] *= 40.0
    peaks = np.abs(x).reshape(-1, K).max(axis=0)
    assert smoothing_factors(np.ones(K, np.float32), w) is None  # even channels stay as they are
    factors = smoothing_factors(peaks, w)
    source, plain, smoothed = _graph(tmp_path, {"proj": w}, {"proj": "x"}), tmp_path / "a.onnx", tmp_path / "b.onnx"
    quantize_rows(source, plain, set())
    unmeasured = ActivationStats(peaks, np.zeros((K, K)))  # no Gram: every weight rounds to nearest
    assert quantize_rows(source, smoothed, set(), calibrated=Calibrated({"x": unmeasured})).smoothed == ["x"]
    (got,) = _run(smoothed, x)
    np.testing.assert_allclose(got, _scheme(x * (1 / factors), w * factors[:, None]), rtol=1e-5, atol=1e-5)
    error = {name: np.abs(_run(path, x)[0] - x @ w).mean() for name, path in (("plain", plain), ("smoothed", smoothed))}
    assert error["smoothed"] < error["plain"] / 2


def test_float_matmuls_that_share_an_input_run_as_one_gemm(tmp_path):
    """Q, K and V kept in float become one MatMul and a Split, as the fp32 graph's fused Attention."""
    rng = np.random.default_rng(6)
    weights = {name: rng.normal(size=(K, K)).astype(np.float32) for name in ("q", "k", "v", "out")}
    source = _graph(tmp_path, weights, {"q": "x", "k": "x", "v": "x", "out": "q"})
    rewritten = tmp_path / "int8.onnx"
    assert quantize_rows(source, rewritten, {"q", "k", "v"}) == Rewrite(["out"], ["k", "q", "v"])
    ops = Counter(node.op_type for node in onnx.load(str(rewritten)).graph.node)
    assert ops["MatMul"] == 1 and ops["Split"] == 1 and ops["MatMulIntegerToFloat"] == 1
    x = rng.normal(size=(2, 3, K)).astype(np.float32)
    for got, want in zip(_run(rewritten, x)[:3], _run(source, x)[:3], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_a_switched_graph_runs_only_the_form_asked_for(tmp_path):
    """Each group's two forms sit in the branches of an `If`: a probe pays for one of them, not both."""
    rng = np.random.default_rng(9)
    weights = {name: rng.normal(size=(K, K)).astype(np.float32) for name in ("q", "k", "v", "out")}
    switched = tmp_path / "switched.onnx"
    quantize_rows(_graph(tmp_path, weights, {"q": "x", "k": "x", "v": "x", "out": "q"}), switched, set(), switched=True)
    x = rng.normal(size=(1, 4, K)).astype(np.float32)

    def kernels_run(int8: bool) -> Counter:
        options = ort.SessionOptions()
        options.enable_profiling, options.profile_file_prefix = True, str(tmp_path / "profile")
        session = ort.InferenceSession(str(switched), options, providers=["CPUExecutionProvider"])
        session.run(None, {"x": x, SWITCH + "x": np.array(int8), SWITCH + "q": np.array(int8)})
        events = json.loads(Path(session.end_profiling()).read_text())
        return Counter(
            e["args"]["op_name"] for e in events if e.get("cat") == "Node" and "op_name" in e.get("args", {})
        )

    as_float, as_int8 = kernels_run(False), kernels_run(True)
    assert as_float["MatMul"] == 4 and as_float["MatMulIntegerToFloat"] == 0
    assert as_int8["MatMulIntegerToFloat"] == 2 and as_int8["MatMul"] == 0


def test_weights_rounded_with_error_feedback_answer_closer_on_text_not_calibrated_on(tmp_path):
    """Inputs whose channels move together (as real activations do): rounding each weight to nearest
    lets the errors add up along them; error feedback fitted on calibration rows spreads them, and
    rows it never saw come out closer. Levels and scales are unchanged, so nothing else is."""
    rng = np.random.default_rng(10)
    mixing = rng.normal(size=(8, K)).astype(np.float32)  # 8 hidden factors drive the 96 channels

    def rows(count: int) -> np.ndarray:
        return (rng.normal(size=(1, count, 8)) @ mixing + 0.05 * rng.normal(size=(1, count, K))).astype(np.float32)

    w = rng.normal(size=(K, N)).astype(np.float32)
    calibration, held_out = rows(400), rows(200)
    peaks = np.ones(K, np.float32)  # even channels: nothing smoothed, only the rounding differs
    gram = (calibration[0].astype(np.float64).T @ calibration[0]).astype(np.float64)
    source = _graph(tmp_path, {"proj": w}, {"proj": "x"})
    nearest, fed_back = tmp_path / "nearest.onnx", tmp_path / "fed_back.onnx"
    quantize_rows(source, nearest, set())
    quantize_rows(source, fed_back, set(), calibrated=Calibrated({"x": ActivationStats(peaks, gram)}))
    levels = {init.name: numpy_helper.to_array(init) for init in onnx.load(str(fed_back)).graph.initializer}
    assert np.abs(levels["proj.int8.weight"]).max() <= WEIGHT_LEVELS  # still exact on every kernel
    exact = held_out @ w
    error = {path.stem: np.abs(_run(path, held_out)[0] - exact).mean() for path in (nearest, fed_back)}
    assert error["fed_back"] < 0.7 * error["nearest"]


def _bounded_graph(tmp_path: Path, op: str, w: np.ndarray, bias: np.ndarray) -> Path:
    """x[batch, rows, K] -> Relu or BiasGelu (bounded below) -> MatMul -> Add(bias): an FFN's output
    projection, as the fp32 graph holds it."""
    activation = (
        helper.make_node("Relu", ["x"], ["h"], name="act")
        if op == "Relu"
        else helper.make_node("BiasGelu", ["x", "gelu_bias"], ["h"], name="act", domain="com.microsoft")
    )
    nodes = [
        activation,
        helper.make_node("MatMul", ["h", "w"], ["y"], name="proj"),
        helper.make_node("Add", ["y", "bias"], ["out"], name="proj_bias"),
    ]
    constants = {"w": w, "bias": bias, "gelu_bias": np.zeros(K, np.float32)}
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "rows", K])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(value.astype(np.float32), name) for name, value in constants.items()],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    path = tmp_path / f"{op}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    return path


@pytest.mark.parametrize("op", ["Relu", "BiasGelu"])
def test_an_activation_bounded_below_is_quantised_on_one_side_with_twice_the_levels(tmp_path, monkeypatch, op):
    """A GELU's output never goes below -0.17, so symmetric codes leave half their range nearly
    empty; shifted onto [0, peak] a row gets all 255 codes, and the shift's share of the product,
    a constant per column, goes into the bias the graph adds anyway: no kernel more, half the error,
    and still the same bits for a row alone and in any batch."""
    from kiln.export import one_sided as bounds

    rng = np.random.default_rng(11)
    w = rng.integers(-WEIGHT_LEVELS, WEIGHT_LEVELS + 1, size=(K, N)).astype(np.float32)
    w[0] = WEIGHT_LEVELS  # every level exact: what is left is the activation's rounding
    bias = rng.normal(size=N).astype(np.float32)
    source = _bounded_graph(tmp_path, op, w, bias)
    one_sided, symmetric, switched = tmp_path / "one.onnx", tmp_path / "sym.onnx", tmp_path / "switched.onnx"
    assert quantize_rows(source, one_sided, set()).shifted == ["h"]
    assert quantize_rows(source, switched, set(), switched=True).shifted == ["h"]
    graph = onnx.load(str(one_sided)).graph
    assert Counter(node.op_type for node in graph.node)["Add"] == 1  # the shift went into the bias
    monkeypatch.setattr(bounds, "LOWER_BOUNDS", {})
    assert quantize_rows(source, symmetric, set()).shifted == []

    x = rng.normal(size=(4, 25, K)).astype(np.float32)
    (exact,) = _run(source, x)
    (got,) = _run(one_sided, x)
    flags = {SWITCH + "h": np.array(True)}
    np.testing.assert_allclose(_run(switched, x, **flags)[0], got, rtol=1e-5, atol=1e-5)  # its Add after the GEMM
    errors = {name: np.abs(_run(path, x)[0] - exact).mean() for name, path in (("one", one_sided), ("sym", symmetric))}
    assert errors["one"] < 0.6 * errors["sym"]
    alone = np.concatenate([_run(one_sided, row[None])[0] for row in x])
    assert np.array_equal(alone, got)
