"""Self-attention over packed Q, K and V as one op, ai.kiln.SelfAttention, with its definition.

kiln's int8 graphs project Q, K and V in one GEMM and split its output (kiln.export.rowwise_int8);
onnxruntime's MultiHeadAttention then takes the three parts. The pair becomes

    SelfAttention(qkv, bias, key_lengths) {num_heads}  :=  MultiHeadAttention(Split(qkv), bias, key_lengths)

and the graph carries that definition as a model-local ONNX function, so a package loads and runs
anywhere: without kiln's kernels library onnxruntime inlines the function and runs exactly the ops it
ran before. With the library (kiln.runtime.native, attention.c) one kernel runs it, 2-4x faster than
MultiHeadAttention on a text of a few dozen tokens, where onnxruntime's cost is around the arithmetic
(transposes, a GEMM call per head), not in it.

Not the same bits: onnxruntime's exp and GEMM kernels differ from kiln's (and by CPU); the two forms
agree to float rounding (max |difference| ~1e-6 on unit-scale inputs, tests/test_native.py), and the
export gates the package both ways. What holds bit for bit in each form: a text's outputs do not
depend on the batch it is in (the gate's drift check runs both).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kiln.export import graph_edges
from kiln.runtime.native import DOMAIN, SELF_ATTENTION

if TYPE_CHECKING:
    from onnx import FunctionProto, ModelProto, NodeProto

MS_DOMAIN = "com.microsoft"
# a masked key's filter at or below this is what the kernel does (excludes it): exp underflows to 0
FILTER_AT_MOST = -1e4


def fuse(model: ModelProto, opset: int) -> int:
    """Replace each Split of a packed projection that only feeds a MultiHeadAttention's Q, K and V
    (equal parts, key lengths as its mask) by SelfAttention, and add the definition for this ONNX
    opset. Returns how many. The caller (kiln.export.rowwise_int8) declares the domains and drops
    the constants no node reads any more (the Splits' widths)."""
    graph = model.graph
    producers, readers = graph_edges.producers(graph), graph_edges.read_counts(graph)
    fused: dict[str, NodeProto] = {}  # the Split's name -> the op that replaces it and its attention
    gone: set[str] = set()
    for node in graph.node:
        split = producers.get(node.input[0]) if _fusable(node, producers) else None
        if split is None or split.op_type != "Split" or list(split.output) != list(node.input[:3]):
            continue
        if any(readers[out] != 1 for out in split.output) or not _equal_parts(split, graph):
            continue
        fused[split.name] = _self_attention(split.input[0], node)
        gone |= {split.name, node.name}
    if not fused:
        return 0
    nodes = [fused.get(node.name, node) for node in graph.node if node.name in fused or node.name not in gone]
    del graph.node[:]
    graph.node.extend(nodes)
    model.functions.append(function(opset))
    return len(fused)


def _fusable(node: NodeProto, producers: dict[str, NodeProto]) -> bool:
    """A MultiHeadAttention on Q, K, V, bias and key lengths (a ReduceSum of the mask, 1-D), no more."""
    if node.op_type != "MultiHeadAttention" or node.domain != MS_DOMAIN or len(node.input) != 5:
        return False
    attributes = {a.name: a for a in node.attribute}
    if set(attributes) - {"num_heads", "mask_filter_value"} or "num_heads" not in attributes:
        return False
    if "mask_filter_value" in attributes and attributes["mask_filter_value"].f > FILTER_AT_MOST:
        return False
    lengths = producers.get(node.input[4])
    keepdims = next((a.i for a in lengths.attribute if a.name == "keepdims"), 1) if lengths is not None else 1
    return lengths is not None and lengths.op_type == "ReduceSum" and keepdims == 0 and bool(node.input[3])


def _equal_parts(split: NodeProto, graph) -> bool:
    """A Split on the last axis into three equal parts (its widths a constant of three equal numbers)."""
    from onnx import numpy_helper

    axis = next((a.i for a in split.attribute if a.name == "axis"), 0)
    if len(split.output) != 3 or axis not in (-1, 2) or len(split.input) != 2:
        return False
    widths = next((numpy_helper.to_array(i) for i in graph.initializer if i.name == split.input[1]), None)
    return widths is not None and widths.shape == (3,) and len(set(widths.tolist())) == 1


def _self_attention(qkv: str, attention: NodeProto) -> NodeProto:
    from onnx import helper

    attributes = {a.name: helper.get_attribute_value(a) for a in attention.attribute}
    return helper.make_node(
        SELF_ATTENTION,
        [qkv, attention.input[3], attention.input[4]],
        list(attention.output),
        name=f"{attention.name}.kiln",
        domain=DOMAIN,
        **attributes,
    )


def function(opset: int) -> FunctionProto:
    """The op's definition in the ops it replaces, for a graph of this ONNX opset."""
    from onnx import AttributeProto, helper

    split = (
        helper.make_node("Split", ["qkv"], ["q", "k", "v"], axis=-1, num_outputs=3)
        if opset >= 18  # Split names its parts' count from opset 18; before, equal parts by outputs
        else helper.make_node("Split", ["qkv"], ["q", "k", "v"], axis=-1)
    )
    attention = helper.make_node("MultiHeadAttention", ["q", "k", "v", "bias", "key_lengths"], ["y"], domain=MS_DOMAIN)
    attention.attribute.extend(
        [
            helper.make_attribute_ref("num_heads", AttributeProto.INT),
            helper.make_attribute_ref("mask_filter_value", AttributeProto.FLOAT),
        ]
    )
    return helper.make_function(
        DOMAIN,
        SELF_ATTENTION,
        ["qkv", "bias", "key_lengths"],
        ["y"],
        [split, attention],
        [helper.make_opsetid("", opset), helper.make_opsetid(MS_DOMAIN, 1)],
        attributes=["num_heads", "mask_filter_value"],
    )
