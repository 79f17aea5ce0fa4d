"""Gemm with a constant weight, as MatMul + Add, so that kiln's per-row int8 sees it.

GPT-2's Conv1D layers trace to Gemm on a 2-D view of the activations (`torch.addmm`); kiln's int8
(kiln.export.rowwise_int8) rewrites constant-weight MatMuls, as onnxruntime's dynamic quantiser
splits a Gemm first too. Only the plain form is rewritten (alpha = beta = 1, A not transposed; a
transposed constant B is stored transposed): the same products and bias, in float to rounding.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from kiln.export import graph_edges
from onnx import helper, numpy_helper


def split_constant_gemms(model_path: Path) -> int:
    """Rewrite the graph file in place; returns how many Gemms became MatMul + Add."""
    model = onnx.load(str(model_path))
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    reads = graph_edges.read_counts(graph)
    nodes, split = [], 0
    for node in graph.node:
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attributes.get("alpha", 1.0) == 1.0 and attributes.get("beta", 1.0) == 1.0
        transposed = attributes.get("transB", 0)
        shared = transposed and reads[node.input[1]] > 1  # another reader needs it as it is
        if node.op_type != "Gemm" or node.input[1] not in weights or attributes.get("transA", 0) or not plain or shared:
            nodes.append(node)
            continue
        if transposed:
            weight = weights[node.input[1]]
            weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight).T.copy(), weight.name))
        product = f"{node.output[0]}/product"
        name = node.name or node.output[0]  # int8 finds MatMuls by name: each must have its own
        nodes.append(helper.make_node("MatMul", [node.input[0], node.input[1]], [product], name=f"{name}/MatMul"))
        if len(node.input) > 2 and node.input[2]:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{name}/Add"))
        else:
            nodes.append(helper.make_node("Identity", [product], [node.output[0]], name=f"{name}/Identity"))
        split += 1
    if split:
        del graph.node[:]
        graph.node.extend(nodes)
        onnx.save(model, str(model_path))
    return split
