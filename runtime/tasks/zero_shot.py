"""zero-shot-classification: candidate labels ranked by an NLI model's entailment."""

from __future__ import annotations

from kiln.runtime.pipelines.base import Prepared
from kiln.runtime.pipelines.zero_shot import DEFAULT_TEMPLATE, ZeroShotClassificationPipeline
from kiln.runtime.tasks.spec import Param, Params, TaskSpec, Tensor, Texts


def prepare(pipe: ZeroShotClassificationPipeline, texts: Texts, params: Params) -> Prepared:
    return pipe.prepare(texts["text"], texts["candidate_labels"], params["hypothesis_template"], params["multi_label"])


SPEC = TaskSpec(
    task="zero-shot-classification",
    pipeline=ZeroShotClassificationPipeline,
    inputs=(Tensor("text", "BYTES", (-1,)), Tensor("candidate_labels", "BYTES", (-1,), per_row=False)),
    parameters=(
        Param("hypothesis_template", str, DEFAULT_TEMPLATE, help="the hypothesis, {} standing for the label"),
        Param("multi_label", bool, False, help="score each label on its own"),
    ),
    prepare=prepare,
    labels=True,
)
