"""A residual block's end as one op, ai.kiln.SkipLayerNorm, with its definition.

After each attention and FFN output projection an encoder adds the projection's bias, then the
residual, then normalises: three kernels, each a pass over the tensor and onnxruntime's fixed cost
per kernel (about 10% of an int8 roberta-base run on a text of a few dozen tokens). The three become

    SkipLayerNorm(x, bias, skip, gamma, beta) {epsilon}  :=  LayerNormalization((x + bias) + skip, gamma, beta)

and the graph carries that definition as a model-local ONNX function, so a package loads and runs
anywhere: without kiln's kernels library onnxruntime inlines the function and runs exactly the ops it
ran before; with it (kiln.runtime.native, layer_norm.c) one kernel runs it.

Not the same bits: the kernel sums in 16 lanes and multiplies by the inverse deviation where
onnxruntime sums one value after another and divides. The two forms agree to float rounding, and
the export gates the package both ways; each form alone is batch-invariant (rows are independent).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kiln.export import graph_edges
from kiln.runtime.native import DOMAIN, SKIP_LAYER_NORM

if TYPE_CHECKING:
    from onnx import FunctionProto, ModelProto, NodeProto

MIN_OPSET = 17  # LayerNormalization is a standard op from opset 17


def fuse(model: ModelProto, opset: int) -> int:
    """Replace each Add(bias) -> Add(residual) -> LayerNormalization over the last axis, where the
    bias is a constant vector and each sum feeds only the next step, by SkipLayerNorm, and add the
    definition. Returns how many."""
    if opset < MIN_OPSET:
        return 0
    graph = model.graph
    producers, readers = graph_edges.producers(graph), graph_edges.read_counts(graph)
    vectors = {init.name: init.dims[0] for init in graph.initializer if len(init.dims) == 1}
    fused: dict[str, NodeProto] = {}  # the LayerNormalization's name -> its replacement
    gone: set[str] = set()
    for norm in graph.node:
        if not _last_axis_norm(norm):
            continue
        residual = producers.get(norm.input[0])
        if residual is None or residual.op_type != "Add" or readers[norm.input[0]] != 1:
            continue
        for side in (0, 1):
            add_bias = producers.get(residual.input[side])
            if add_bias is None or add_bias.op_type != "Add" or readers[residual.input[side]] != 1:
                continue
            bias = [i for i in add_bias.input if i in vectors]
            if len(bias) != 1 or add_bias.input[0] == add_bias.input[1] or not _as_wide(bias[0], norm, vectors):
                continue
            x = next(i for i in add_bias.input if i != bias[0])
            fused[norm.name] = _skip_layer_norm(x, bias[0], residual.input[1 - side], norm)
            gone |= {add_bias.name, residual.name}
            break
    if not fused:
        return 0
    nodes = [fused.get(node.name, node) for node in graph.node if node.name not in gone]
    del graph.node[:]
    graph.node.extend(nodes)
    model.functions.append(function(opset))
    return len(fused)


def _last_axis_norm(node: NodeProto) -> bool:
    """A standard LayerNormalization over the last axis, with scale and bias and one output."""
    if node.op_type != "LayerNormalization" or node.domain not in ("", "ai.onnx"):
        return False
    attributes = {a.name: a for a in node.attribute}
    axis = attributes["axis"].i if "axis" in attributes else -1
    return axis == -1 and len(node.input) == 3 and all(node.input) and len([o for o in node.output if o]) == 1


def _as_wide(bias: str, norm: NodeProto, vectors: dict[str, int]) -> bool:
    """The bias as long as the norm's scale and offset (constants): the kernel takes no broadcast."""
    return all(vectors.get(name) == vectors[bias] for name in norm.input[1:3])


def _skip_layer_norm(x: str, bias: str, skip: str, norm: NodeProto) -> NodeProto:
    from onnx import helper

    epsilon = next((a.f for a in norm.attribute if a.name == "epsilon"), 1e-5)
    return helper.make_node(
        SKIP_LAYER_NORM,
        [x, bias, skip, norm.input[1], norm.input[2]],
        [norm.output[0]],
        name=f"{norm.name}.kiln",
        domain=DOMAIN,
        epsilon=epsilon,
    )


def function(opset: int) -> FunctionProto:
    """The op's definition in the ops it replaces, for a graph of this ONNX opset (17 or newer)."""
    from onnx import AttributeProto, helper

    norm = helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["y"], axis=-1)
    norm.attribute.append(helper.make_attribute_ref("epsilon", AttributeProto.FLOAT))
    return helper.make_function(
        DOMAIN,
        SKIP_LAYER_NORM,
        ["x", "bias", "skip", "gamma", "beta"],
        ["y"],
        [
            helper.make_node("Add", ["x", "bias"], ["biased"]),
            helper.make_node("Add", ["biased", "skip"], ["sum"]),
            norm,
        ],
        [helper.make_opsetid("", opset)],
        attributes=["epsilon"],
    )
