"""The tasks kiln serves, one registered spec each (see kiln.runtime.tasks.spec)."""

from __future__ import annotations

from kiln.runtime.errors import PackageError
from kiln.runtime.tasks import (
    feature_extraction,
    fill_mask,
    generation,
    question_answering,
    text_classification,
    token_classification,
    zero_shot,
)
from kiln.runtime.tasks.spec import Param, TaskSpec, Tensor, Texts

SPECS: dict[str, TaskSpec] = {
    module.SPEC.task: module.SPEC
    for module in (
        text_classification,
        token_classification,
        question_answering,
        feature_extraction,
        fill_mask,
        zero_shot,
    )
}
SPECS.update({spec.task: spec for spec in generation.SPECS})


def spec_for(task: str) -> TaskSpec:
    if task not in SPECS:
        raise PackageError(f"unknown task {task!r}; kiln serves {', '.join(SPECS)}")
    return SPECS[task]


__all__ = ["SPECS", "Param", "TaskSpec", "Tensor", "Texts", "spec_for"]
