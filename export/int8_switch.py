"""The int8 ladder's switched graph: each group of MatMuls that read one activation in both forms,
int8 and float, chosen per run by a bool input (kiln.export.rowwise_int8 builds the int8 form,
kiln.export.sensitivity and kiln.export.precision steer it)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from onnx import GraphProto, NodeProto

SWITCH = "kiln_int8:"  # a switched graph's bool inputs: SWITCH + the activation its group reads


def switch(graph: GraphProto, matmuls: list[NodeProto], made: list[NodeProto], flag: str) -> NodeProto:
    """One `If` on the bool input `flag` that runs the group's int8 nodes (true) or its float MatMuls
    (false) and gives their outputs: only the branch taken runs, so a probe costs one form of each
    group, not both (a `Where` between the two forms ran both: the ladder's sessions took twice as
    long). The branches read the activation and the weights from the graph around them."""
    from onnx import TensorProto, helper

    graph.input.append(helper.make_tensor_value_info(flag, TensorProto.BOOL, []))
    outputs = [matmul.output[0] for matmul in matmuls]

    def branch(nodes: list[NodeProto], form: str) -> GraphProto:
        renamed = {out: f"{out}.{form}" for out in outputs}
        for node in nodes:
            node.output[:] = [renamed.get(name, name) for name in node.output]
        results = [helper.make_tensor_value_info(renamed[out], TensorProto.FLOAT, None) for out in outputs]
        return helper.make_graph(nodes, f"{flag}.{form}", [], results)

    floating = [helper.make_node("MatMul", list(m.input), list(m.output), name=m.name) for m in matmuls]
    int8, float_ = branch(made, "int8"), branch(floating, "float")
    return helper.make_node("If", [flag], outputs, name=f"{flag}.if", then_branch=int8, else_branch=float_)


def with_branches(nodes: Iterable[NodeProto]) -> Iterator[NodeProto]:
    """Every node, those inside an `If`'s branches included."""
    for node in nodes:
        yield node
        for attribute in node.attribute:
            if attribute.g.node:
                yield from with_branches(attribute.g.node)
