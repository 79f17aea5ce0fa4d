"""The key scale moved onto the queries (kiln.export.key_transpose): the same scores to float
rounding, onnxruntime then reads the KV cache in place, and a scale that is not one value stays."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from kiln.export.key_transpose import move_key_scales
from onnx import TensorProto, helper

HEADS, HEAD_DIM = 2, 8


def scores_graph(path: Path, scale_shape: list[int]) -> Path:
    """MatMul(Mul(Q, s), Mul(Transpose(K), s)), as transformers' SDPA attention is traced."""
    rng = np.random.default_rng(0)
    scale = (rng.random(scale_shape, dtype=np.float32) + 0.5) * HEAD_DIM**-0.25
    nodes = [
        helper.make_node("Transpose", ["key"], ["key_t"], name="transpose", perm=[0, 1, 3, 2]),
        helper.make_node("Mul", ["key_t", "scale"], ["key_scaled"], name="key_scale"),
        helper.make_node("Mul", ["query", "scale"], ["query_scaled"], name="query_scale"),
        helper.make_node("MatMul", ["query_scaled", "key_scaled"], ["scores"], name="scores"),
    ]
    graph = helper.make_graph(
        nodes,
        "scores",
        [
            helper.make_tensor_value_info("query", TensorProto.FLOAT, ["batch", HEADS, 1, HEAD_DIM]),
            helper.make_tensor_value_info("key", TensorProto.FLOAT, ["batch", HEADS, "past", HEAD_DIM]),
        ],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(scale, "scale")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def run(path: Path, feeds: dict[str, np.ndarray], optimized: Path | None = None) -> np.ndarray:
    options = ort.SessionOptions()
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_a_scalar_scale_moves_and_the_transpose_is_fused_into_the_matmul(tmp_path):
    path = scores_graph(tmp_path / "scores.onnx", [1])
    rng = np.random.default_rng(1)
    feeds = {
        "query": rng.standard_normal((3, HEADS, 1, HEAD_DIM), dtype=np.float32),
        "key": rng.standard_normal((3, HEADS, 17, HEAD_DIM), dtype=np.float32),
    }
    before = run(path, feeds)
    assert move_key_scales(path) == 1
    after = run(path, feeds, optimized=tmp_path / "optimized.onnx")
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6)
    optimized = [node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert "Transpose" not in optimized and "FusedMatMul" in optimized  # the cache is read where it is


@pytest.mark.parametrize("shape", [[HEAD_DIM, 1], [1, 1, HEAD_DIM, 1]])
def test_a_scale_that_is_not_one_value_stays_where_it_is(tmp_path, shape):
    path = scores_graph(tmp_path / "scores.onnx", shape)
    assert move_key_scales(path) == 0


def test_exported_gpt2_reads_its_cache_in_place_and_keeps_every_token(generator_package, tmp_path):
    """The fp32 package's gate still finds every greedy token identical (test_export_generation);
    here: every layer's key scale moved, and onnxruntime's graph has no Transpose of the cache left."""
    package = generator_package("gpt2")
    manifest = json.loads((package / "kiln.json").read_text())
    layers = json.loads((package / "config.json").read_text())["n_layer"]
    assert f"key scales moved onto the queries in {layers} attention MatMuls" in json.dumps(manifest)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(package / "model.onnx"), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(str(tmp_path / "optimized.onnx")).graph
    read_in_place = [n for n in graph.node if n.op_type == "FusedMatMul" and n.input[1].startswith("present.")]
    transposed = [n for n in graph.node if n.op_type == "Transpose" and n.input[0].startswith("present.")]
    assert len(read_in_place) == layers and not transposed
