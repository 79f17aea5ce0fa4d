"""How KServe and Triton describe a served model: its metadata (inputs, outputs) and Triton's model
configuration, in their JSON forms (the gRPC messages have the same fields). Triton's tools read
these to drive a model: perf_analyzer fills every listed input and asks for every listed output.

Encoders whose inputs are all one value per row are described with Triton's batch convention
(max_batch_size > 0, every input [batch, 1]): perf_analyzer strips the batch dimension and needs
what is left to be fixed, so it drives them with no flags. Zero-shot's label list and generators'
control inputs are not one value per row; those models keep max_batch_size 0 and [-1] shapes. The
token-id path's inputs and the graph outputs it answers with are accepted but not listed (config
parameters `token_inputs`, `token_outputs` name them): listed, perf_analyzer would fill the inputs
with random ids and ask text requests for the outputs.
"""

from __future__ import annotations

from typing import Any

from kiln.runtime.serve.kserve_codec import CODECS
from kiln.runtime.tasks.spec import Tensor

CONFIG_TYPES = {
    "BYTES": "TYPE_STRING",
    "FP32": "TYPE_FP32",
    "INT64": "TYPE_INT64",
    "INT32": "TYPE_INT32",
    "BOOL": "TYPE_BOOL",
}


def metadata(model: Any) -> dict[str, Any]:
    """KServe v2 model metadata of a served model (ServedModel or GenerativeModel)."""
    inputs = [_tensor(t.name, t.datatype, _wire_shape(t, model)) for t in model.spec.inputs]
    outputs = [_tensor(t.name, t.datatype, t.resolved_shape(model.sizes)) for t in CODECS[model.spec.task].outputs]
    return {
        "name": model.name,
        "versions": [model.version],
        "platform": "onnxruntime_onnx",
        "inputs": inputs,
        "outputs": outputs,
    }


def config(model: Any) -> dict[str, Any]:
    """Triton's model configuration of a served model, as Triton's load tools read it."""
    sizes, spec, options, manifest = model.sizes, model.spec, model.options, model.manifest
    batched = _batched(model)
    inputs = [
        {
            "name": t.name,
            "data_type": CONFIG_TYPES[t.datatype],
            # Triton's config leaves the batch dimension out of dims when max_batch_size > 0
            "dims": _wire_shape(t, model)[1:] if batched else t.resolved_shape(sizes),
            "optional": t.optional,
        }
        for t in spec.inputs
    ]
    strings = {
        "task": manifest.task,
        "precision": manifest.precision,
        "target": manifest.target,
        "max_batch_tokens": str(options.max_tokens),
        "max_sequence_length": str(manifest.max_sequence_length),
        "request_parameters": ",".join(p.name for p in spec.parameters),
    }
    if not spec.generative:  # the token-id path's tensors, named rather than listed
        strings["token_inputs"] = ",".join(manifest.inputs)
        strings["token_outputs"] = ",".join(manifest.outputs)
    if manifest.mask_token:  # fill-mask: what a text must hold
        strings["mask_token"] = manifest.mask_token
    return {
        "name": model.name,
        "platform": "onnxruntime_onnx",
        "backend": "kiln",
        "max_batch_size": options.max_size if batched else 0,
        "input": inputs,
        "output": [
            {"name": t.name, "data_type": CONFIG_TYPES[t.datatype], "dims": t.resolved_shape(sizes)}
            for t in CODECS[spec.task].outputs
        ],
        "dynamic_batching": {
            "preferred_batch_size": [options.max_size],
            "max_queue_delay_microseconds": int(options.max_delay * 1e6),
        },
        "parameters": {key: {"string_value": value} for key, value in strings.items()},
        # generators answer a request with many responses (Triton's decoupled mode)
        "model_transaction_policy": {"decoupled": spec.generative},
    }


def _batched(model: Any) -> bool:
    return not model.spec.generative and all(t.per_row for t in model.spec.inputs)


def _wire_shape(tensor: Tensor, model: Any) -> list[int]:
    """An input's shape in metadata: [-1, 1] for one text per row under Triton's batch convention
    (requests may still send [N]), else the task's own shape."""
    return [-1, 1] if _batched(model) else tensor.resolved_shape(model.sizes)


def _tensor(name: str, datatype: str, shape: list[int]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape}
