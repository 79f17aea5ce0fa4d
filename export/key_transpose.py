"""A scale on the transposed keys, moved onto the queries, so onnxruntime reads the KV cache in place.

transformers' SDPA attention, as optimum-onnx traces it for GPT-2 (and other decoders that scale
both sides by the square root of 1/sqrt(head_dim)), computes the scores as

    MatMul(Mul(Q, s), Mul(Transpose(K, last two axes swapped), s))

With a past, K is the whole cache, so every decoding step copied it twice (the Transpose, then the
Mul) before the MatMul read it: 40% of a GPT-2-small step at 32 rows and 64 cached tokens
(onnxruntime's profile, docs/generation.md). Rewritten as

    MatMul(Mul(Mul(Q, s), s), Transpose(K, last two axes swapped))

onnxruntime's own MatMulTransposeFusion, at session load, makes the Transpose + MatMul one
FusedMatMul that reads K where it is. The scale must be a scalar (checked by shape inference) for
the move to keep the arithmetic; the product is regrouped, so the scores agree to float rounding,
not bit for bit, and the export's gate measures the package as always.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import onnx
from kiln.export import graph_edges

if TYPE_CHECKING:
    from onnx import NodeProto


def move_key_scales(model_path: Path) -> int:
    """Rewrite the graph file in place (its weights stay where they are); returns how many."""
    model = onnx.load(str(model_path), load_external_data=False)
    moved = _move(model)
    if moved:
        onnx.save(model, str(model_path))
    return moved


def _move(model: onnx.ModelProto) -> int:
    graph = model.graph
    producers, readers = graph_edges.producers(graph), graph_edges.read_counts(graph)
    scalars = _scalar_names(model)
    moves: dict[str, tuple[NodeProto, NodeProto]] = {}  # MatMul name -> (its key-side Mul, the new query Mul)
    for node in graph.node:
        scale = producers.get(node.input[1]) if node.op_type == "MatMul" and node.name else None
        if scale is None or scale.op_type != "Mul" or not scale.name or readers[scale.output[0]] != 1:
            continue  # nodes are found again by name below, so unnamed ones are left as they are
        transpose = producers.get(scale.input[0])
        if not _swaps_last_two(transpose) or readers[transpose.output[0]] != 1 or scale.input[1] not in scalars:
            continue
        query = onnx.helper.make_node(
            "Mul", [node.input[0], scale.input[1]], [f"{scale.output[0]}/on_query"], name=f"{scale.name}/on_query"
        )
        moves[node.name] = (scale, query)
    if not moves:
        return 0
    gone = {scale.name for scale, _ in moves.values()}
    nodes: list[NodeProto] = []
    for node in graph.node:
        if node.name in gone:
            continue
        if node.name in moves:
            scale, query = moves[node.name]
            nodes.append(query)
            node.input[0], node.input[1] = query.output[0], scale.input[0]
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return len(moves)


def _swaps_last_two(node: NodeProto | None) -> bool:
    if node is None or node.op_type != "Transpose":
        return False
    perm = next((list(onnx.helper.get_attribute_value(a)) for a in node.attribute if a.name == "perm"), None)
    rank = len(perm or [])
    return rank >= 2 and perm == [*range(rank - 2), rank - 1, rank - 2]


def _scalar_names(model: onnx.ModelProto) -> set[str]:
    """Tensors shape inference says hold one value (rank 0, or every dimension 1)."""
    inferred = onnx.shape_inference.infer_shapes(model).graph
    scalars = set()
    for info in [*inferred.value_info, *inferred.input, *inferred.initializer]:
        dims = _dims(info)
        if dims is not None and all(d == 1 for d in dims):
            scalars.add(info.name)
    return scalars


def _dims(info: onnx.ValueInfoProto | onnx.TensorProto) -> list[int | str] | None:
    if isinstance(info, onnx.TensorProto):
        return list(info.dims)
    tensor = info.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]
