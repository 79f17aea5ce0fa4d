"""Who makes and who reads each tensor of an ONNX graph: what kiln's graph fusions check before
they remove a node (kiln.export.self_attention, kiln.export.skip_layer_norm)."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from onnx import GraphProto, NodeProto


def producers(graph: GraphProto) -> dict[str, NodeProto]:
    """Each node output's node."""
    return {out: node for node in graph.node for out in node.output}


def read_counts(graph: GraphProto) -> Counter[str]:
    """How many times each tensor is read: by nodes, and once more where it is a graph output (the
    caller reads it), so a fusion never drops a tensor someone still reads."""
    reads = Counter(name for node in graph.node for name in node.input)
    reads.update(output.name for output in graph.output)
    return reads
