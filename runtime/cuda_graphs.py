"""CUDA graphs for an encoder on the CUDA execution provider (`SessionOptions.cuda_graphs`).

A transformer at batch 1 is launch-bound on a GPU: the H100 run spent ~1 ms per text mostly
launching a few hundred small kernels. onnxruntime's CUDA EP can capture a run's kernels as one CUDA
graph and replay it (`enable_cuda_graph`), provided every run of that graph reads and writes the
same device buffers. So each (batch, length) shape gets a slot: input and output buffers allocated
on the device once, bound once, and a graph id (`gpu_graph_id`, onnxruntime's multi-graph capture):
the first run of a shape captures its graph, later runs copy the inputs into the slot's buffers and
replay it. Lengths are already padded to multiples of LENGTH_BUCKET on a GPU, so a handful of slots
covers a model's one-text traffic. Shapes past `max_graphs` run without a graph (graph id -1).

This needs a GPU to run; tests/test_providers.py checks it against the plain CUDA run where one is
lent, and skips elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from kiln.runtime.providers import output_shape

GRAPH_ID = "gpu_graph_id"
NO_GRAPH = "-1"
MAX_GRAPHS = 16  # slots captured per session (each holds its buffers on the device for good)
MAX_GRAPH_BATCH = 8  # larger batches are not launch-bound: they run without a graph


@dataclass
class Slot:
    """One captured shape: its device buffers, bound once, and its graph id."""

    inputs: dict[str, Any]  # name -> OrtValue on the device
    outputs: dict[str, Any]
    binding: Any
    options: Any  # onnxruntime.RunOptions carrying the graph id


class CudaGraphs:
    """Runs a session created with `enable_cuda_graph` (see the module doc)."""

    def __init__(self, session: Any, outputs: list[str], max_graphs: int = MAX_GRAPHS):
        import onnxruntime as ort

        self._ort = ort
        self.session, self.outputs, self.max_graphs = session, outputs, max_graphs
        first = session.get_inputs()[0].shape
        self._batch_dim, self._length_dim = first[0], first[1]
        self._shapes = {o.name: o.shape for o in session.get_outputs()}
        self._slots: dict[tuple[int, int], Slot] = {}
        self._plain = ort.RunOptions()
        self._plain.add_run_config_entry(GRAPH_ID, NO_GRAPH)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        batch, length = next(iter(feeds.values())).shape
        slot = self._slot(batch, length, feeds)
        if slot is None:
            return self._run_plain(feeds)
        for name, array in feeds.items():
            slot.inputs[name].update_inplace(np.ascontiguousarray(array))
        self.session.run_with_iobinding(slot.binding, slot.options)
        return [slot.outputs[name].numpy() for name in self.outputs]

    def _slot(self, batch: int, length: int, feeds: dict[str, np.ndarray]) -> Slot | None:
        key = (batch, length)
        if key in self._slots:
            return self._slots[key]
        if batch > MAX_GRAPH_BATCH or len(self._slots) >= self.max_graphs:
            return None
        try:
            shapes = {
                name: output_shape(self._shapes[name], self._batch_dim, self._length_dim, batch, length)
                for name in self.outputs
            }
        except ValueError:  # an output the graph does not size from its inputs: no fixed buffer for it
            return None
        value = self._ort.OrtValue
        inputs = {name: value.ortvalue_from_numpy(np.ascontiguousarray(a), "cuda", 0) for name, a in feeds.items()}
        outputs = {
            name: value.ortvalue_from_shape_and_type(shape, np.float32, "cuda", 0) for name, shape in shapes.items()
        }
        binding = self.session.io_binding()
        for name, buffer in inputs.items():
            binding.bind_ortvalue_input(name, buffer)
        for name, buffer in outputs.items():
            binding.bind_ortvalue_output(name, buffer)
        options = self._ort.RunOptions()
        options.add_run_config_entry(GRAPH_ID, str(len(self._slots) + 1))  # 0 is onnxruntime's default graph
        self._slots[key] = Slot(inputs, outputs, binding, options)
        return self._slots[key]

    def _run_plain(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        for name in self.outputs:
            binding.bind_output(name, "cuda")
        self.session.run_with_iobinding(binding, self._plain)
        return binding.copy_outputs_to_cpu()
