"""Graph form by execution target (kiln export --device): op domains and Q/DQ placement, checked on CPU."""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import onnx
import pytest
from conftest import run_kiln
from kiln.export.qdq import calibrate, matmul_groups, qdq_placement, write_qdq
from kiln.export.targets import graph_form
from kiln.runtime import pipeline
from kiln.runtime.errors import ProviderMismatch, UnsupportedModel
from kiln.runtime.manifest import read_manifest
from kiln.runtime.session import SessionOptions, create_session


def _domains(package) -> Counter:
    graph = onnx.load(str(package / "model.onnx")).graph
    return Counter(node.domain or "ai.onnx" for node in graph.node)


def _ops(package) -> Counter:
    return Counter(node.op_type for node in onnx.load(str(package / "model.onnx")).graph.node)


@pytest.mark.parametrize(
    ("device", "quantize", "precision"),
    [
        ("cpu", "int8", "int8-dynamic"),
        ("cuda", "fp16", "fp16"),
        ("tensorrt", "int8", "int8-static"),
        ("tensorrt", "int8-static", "int8-static"),
        ("cpu", "int8-static", "int8-static"),
    ],
)
def test_precision_by_target(device, quantize, precision):
    assert graph_form(device, quantize).precision == precision


@pytest.mark.parametrize("quantize", ["int8", "int8-static"])
def test_int8_for_cuda_is_refused_with_advice(quantize):
    with pytest.raises(UnsupportedModel, match="--device tensorrt"):
        graph_form("cuda", quantize)


def test_int8_cpus_shape_only_kilns_cpu_int8():
    assert graph_form("cpu", "int8", "vnni").int8_cpus == "vnni"
    assert graph_form("cpu", "int8").int8_cpus == "any"
    with pytest.raises(UnsupportedModel, match="--int8-cpus vnni shapes kiln's CPU int8"):
        graph_form("cpu", "none", "vnni")
    with pytest.raises(UnsupportedModel, match="--int8-cpus must be one of any, vnni"):
        graph_form("cpu", "int8", "avx9")


def test_int8_for_cuda_exits_4_from_the_command_line(tiny_model, tmp_path):
    model = tiny_model("bert", "text-classification")
    result = run_kiln(
        "export", "--model", str(model), "--device", "cuda", "--quantize", "int8", "--output", str(tmp_path / "o")
    )
    assert result.returncode == UnsupportedModel.exit_code and "--device tensorrt" in result.stderr
    assert not (tmp_path / "o").exists()


def test_cpu_form_keeps_the_residual_add_and_layernorm_apart(exported, tmp_path):
    """onnxruntime's CPU SkipLayerNormalization is 4x slower than Add and LayerNormalization: the
    CPU graph keeps them apart, and kiln's sessions keep onnxruntime from fusing them at load."""
    package = exported("bert", "text-classification", "int8")
    assert _ops(package)["SkipLayerNormalization"] == 0 and _ops(package)["LayerNormalization"] > 0
    ran = tmp_path / "optimized.onnx"
    create_session(package / "model.onnx", SessionOptions(optimized_model_path=ran))
    ops = Counter(node.op_type for node in onnx.load(str(ran)).graph.node)
    assert ops["SkipLayerNormalization"] == 0 and ops["LayerNormalization"] > 0 and ops["MatMulIntegerToFloat"] > 0


def test_cuda_form_is_fused_fp16_with_float32_io(exported):
    package = exported("bert", "text-classification", "fp16", "cuda")
    manifest = read_manifest(package)
    assert (manifest.target, manifest.precision) == ("cuda", "fp16")
    ops = _ops(package)
    assert ops["Attention"] == 2 and ops["SkipLayerNormalization"] > 0  # fused, Q/K/V packed
    graph = onnx.load(str(package / "model.onnx")).graph
    assert {o.type.tensor_type.elem_type for o in graph.output} == {onnx.TensorProto.FLOAT}
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in graph.initializer)
    assert manifest.parity["passed"] and manifest.parity["provider"] == "cpu"


@pytest.mark.parametrize("quantize", ["none", "fp16", "int8"])
def test_tensorrt_form_holds_standard_ops_only(exported, quantize):
    package = exported("bert", "text-classification", quantize, "tensorrt")
    assert set(_domains(package)) == {"ai.onnx"}, _domains(package)
    assert read_manifest(package).target == "tensorrt"


def test_tensorrt_int8_quantizes_both_inputs_of_every_matmul(exported):
    package = exported("bert", "text-classification", "int8", "tensorrt")
    placement = qdq_placement(package / "model.onnx")
    # 2 layers x (Q, K, V, attention output, FFN in, FFN out) with weights + 2 x 2 attention products
    assert (placement.matmuls, placement.weight_matmuls) == (16, 12)
    assert placement.float_matmuls == [] and len(placement.int8_matmuls) == 16
    assert placement.quantize_linear > 0 and placement.dequantize_linear >= 12 + placement.quantize_linear
    quantization = read_manifest(package).quantization
    assert quantization["int8_matmuls"] == placement.int8_matmuls and quantization["kept_float"] == []
    assert "Q/DQ on 16 of 16 MatMuls" in quantization["scheme"]


@pytest.mark.filterwarnings("ignore::kiln.runtime.errors.ProviderMismatch")
def test_qdq_shares_one_activation_pair_between_q_k_and_v(exported):
    package = exported("bert", "text-classification", "none", "tensorrt")
    groups = matmul_groups(package / "model.onnx")
    assert sorted(len(members) for members in groups.values()).count(3) == 2  # Q, K, V read one tensor, per layer
    encoder = pipeline(package).encoder
    feeds = [encoder.pad(encoder.tokenize(["a first text", "and a second, longer one"])).feeds]
    calibration = calibrate(package / "model.onnx", feeds)
    qkv = next(m for m in groups.values() if len(m) == 3)
    out = package.parent / "qkv-only.onnx"
    placement = write_qdq(package / "model.onnx", out, set(qkv), calibration)
    assert sorted(placement.int8_matmuls) == sorted(qkv) and len(placement.float_matmuls) == 13
    assert placement.quantize_linear == 1 and placement.dequantize_linear == 4  # one shared activation pair


@pytest.mark.filterwarnings("ignore::kiln.runtime.errors.ProviderMismatch")
def test_qdq_graph_answers_like_fp32_on_cpu(exported):
    texts = ["Alice lives in Seoul", "The markets fell sharply today", "경기는 연장전 끝에 끝났다"]
    fp32 = pipeline(exported("bert", "text-classification", "none", "tensorrt")).logits(texts)[0]
    int8 = pipeline(exported("bert", "text-classification", "int8", "tensorrt")).logits(texts)[0]
    assert (fp32.argmax(1) == int8.argmax(1)).all() and np.abs(fp32 - int8).max() < 0.5


def test_a_package_on_another_provider_warns(exported):
    with pytest.warns(ProviderMismatch, match="shaped for tensorrt"):
        pipeline(exported("bert", "text-classification", "none", "tensorrt"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProviderMismatch)
        pipeline(exported("bert", "text-classification"))  # a CPU package on CPU: no warning
