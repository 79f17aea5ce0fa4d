"""Task specs: parameters are type-checked (a string is not a boolean), inputs are checked by name,
and docs/serving.md's table of tensors and parameters is the one the specs make."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from kiln.runtime.errors import InvalidInput
from kiln.runtime.serve.table import markdown
from kiln.runtime.tasks import SPECS, spec_for


@pytest.mark.parametrize(
    ("task", "raw", "needle"),
    [
        ("text-classification", {"truncation": "false"}, "'truncation' must be a boolean, got str 'false'"),
        ("text-classification", {"top_k": 2.5}, "'top_k' must be an integer"),
        ("text-classification", {"top_k": True}, "'top_k' must be an integer"),
        ("text-classification", {"function_to_apply": "relu"}, "must be one of softmax, sigmoid, none"),
        ("text-classification", {"top-k": 2}, "unknown parameter 'top-k' for text-classification"),
        ("question-answering", {"max_answer_len": 0}, "'max_answer_len' must be at least 1"),
        ("fill-mask", {"targets": [1, 2]}, "'targets' must be a list of strings"),
    ],
)
def test_parameters_are_checked_by_type(task, raw, needle):
    with pytest.raises(InvalidInput, match=needle):
        spec_for(task).parse_params(raw)


def test_parameters_take_defaults_and_transport_ones_pass():
    params = spec_for("text-classification").parse_params({"priority": 1, "timeout": 5000})
    assert params == {"top_k": 1, "function_to_apply": None, "truncation": True}
    assert spec_for("fill-mask").parse_params({"targets": "a, b"})["targets"] == ["a", "b"]


def test_inputs_are_checked_by_name_and_shape():
    spec = spec_for("question-answering")
    question = np.array([b"Who?"], dtype=object)
    with pytest.raises(InvalidInput, match="missing input 'context'"):
        spec.read_texts({"question": question})
    with pytest.raises(InvalidInput, match="unknown input 'answer'"):
        spec.read_texts({"question": question, "context": question, "answer": question})
    with pytest.raises(InvalidInput, match=r"must have shape \[N\]"):
        spec.read_texts({"question": question.reshape(1, 1, 1), "context": question})
    assert spec.read_texts({"question": question, "context": question.reshape(1, 1)}) == {
        "question": ["Who?"],
        "context": ["Who?"],
    }


def test_every_task_has_one_rpc_and_one_head():
    """Every task has a kiln.v1 codec: one RPC per encoder task; the generators share Generate (and
    GenerateStream). Task modules carry no protobuf."""
    from kiln.export.task_exports import EXPORTS
    from kiln.runtime.serve.kserve_codec import CODECS as KSERVE
    from kiln.runtime.serve.typed_codec import CODECS

    encoders = [spec for spec in SPECS.values() if not spec.generative]
    assert set(CODECS) == set(SPECS) == set(KSERVE) == set(EXPORTS)  # every task on every protocol and in export
    assert len({CODECS[spec.task].rpc for spec in encoders}) == len(encoders)
    assert {CODECS[spec.task].rpc for spec in SPECS.values() if spec.generative} == {"Generate"}
    assert all(spec.inputs and KSERVE[spec.task].outputs for spec in SPECS.values())
    tasks = Path(__file__).parents[1] / "runtime" / "tasks"
    assert not [p.name for p in tasks.glob("*.py") if "kiln_pb2" in p.read_text(encoding="utf-8")]
    assert not [p.name for p in tasks.glob("*.py") if "from kiln.export" in p.read_text(encoding="utf-8")]
    assert not {"gate", "head", "rpc", "encode", "outputs"} & set(SPECS["text-classification"].__dataclass_fields__)


def test_readme_table_is_the_specs_table():
    readme = (Path(__file__).parents[1] / "docs" / "serving.md").read_text(encoding="utf-8")
    assert markdown() in readme, "docs/serving.md task table is stale: paste the output of `kiln tasks`"
