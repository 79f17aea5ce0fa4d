"""zero-shot-classification: candidate labels ranked by an NLI model's entailment."""

from __future__ import annotations

from typing import Any

import numpy as np
from kiln.runtime.errors import UnsupportedModel
from kiln.runtime.pipelines.base import Prepared
from kiln.runtime.pipelines.zero_shot import DEFAULT_TEMPLATE, ZeroShotClassificationPipeline
from kiln.runtime.tasks.spec import Gate, Param, Params, TaskSpec, Tensor, Texts

GATE_LABELS = ("politics", "economy", "sports", "technology")


def prepare(pipe: ZeroShotClassificationPipeline, texts: Texts, params: Params) -> Prepared:
    return pipe.prepare(texts["text"], texts["candidate_labels"], params["hypothesis_template"], params["multi_label"])


def check_config(config: dict[str, Any]) -> None:
    """Zero-shot needs an NLI sequence classifier: one of its labels is entailment."""
    architectures = config.get("architectures") or ["a base model"]
    labels = [str(label).lower() for label in (config.get("id2label") or {}).values()]
    if not architectures[0].endswith("ForSequenceClassification") or not any(x.startswith("entail") for x in labels):
        raise UnsupportedModel(
            "zero-shot-classification needs an NLI sequence classifier with an 'entailment' label; "
            f"this model is {architectures[0]} with labels {labels}"
        )


def _theirs(hf: Any, items: Texts, reference: Any, pooling: Any) -> list[Any]:
    return [hf(t, candidate_labels=list(items["candidate_labels"])) for t in items["text"]]


def _agreement(theirs: list[Any], ours: list[Any]) -> dict[str, Any]:
    pairs = list(zip(theirs, ours, strict=True))
    return {
        "items": len(pairs),
        "agreement": float(np.mean([a["labels"][0] == b["labels"][0] for a, b in pairs])),
        "max_score_diff": float(max(abs(a["scores"][0] - b["scores"][0]) for a, b in pairs)),
    }


SPEC = TaskSpec(
    task="zero-shot-classification",
    pipeline=ZeroShotClassificationPipeline,
    head="ForSequenceClassification",  # an NLI classifier
    auto_class="AutoModelForSequenceClassification",
    inputs=(Tensor("text", "BYTES", (-1,)), Tensor("candidate_labels", "BYTES", (-1,), per_row=False)),
    parameters=(
        Param("hypothesis_template", str, DEFAULT_TEMPLATE, help="the hypothesis, {} standing for the label"),
        Param("multi_label", bool, False, help="score each label on its own"),
    ),
    prepare=prepare,
    gate=Gate(
        hf_task="zero-shot-classification",
        items=lambda texts, mask: {"text": texts, "candidate_labels": list(GATE_LABELS)},
        theirs=_theirs,
        agreement=_agreement,
    ),
    labels=True,
    from_head=False,  # an NLI model's head is a sequence classifier's: zero-shot is asked for with --task
    optimum_task="text-classification",
    check_config=check_config,
)
