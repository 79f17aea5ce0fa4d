"""token-classification: entities, grouped as transformers' pipeline groups them."""

from __future__ import annotations

from collections import Counter
from typing import Any

from kiln.runtime.pipelines.base import Prepared
from kiln.runtime.pipelines.token_classification import STRATEGIES, TokenClassificationPipeline
from kiln.runtime.tasks.spec import Gate, Param, Params, TaskSpec, Tensor, Texts


def prepare(pipe: TokenClassificationPipeline, texts: Texts, params: Params) -> Prepared:
    return pipe.prepare(texts["text"], params["aggregation_strategy"], params["ignore_labels"], params["truncation"])


def _entity_f1(theirs: list[list[dict]], ours: list[list[dict]]) -> dict[str, Any]:
    """Entity spans as micro F1: (group, start, end) triples found by both sides."""
    matched = total = 0
    for a, b in zip(theirs, ours, strict=True):
        spans_a, spans_b = Counter(_spans(a)), Counter(_spans(b))
        matched += sum((spans_a & spans_b).values())
        total += sum(spans_a.values()) + sum(spans_b.values())
    return {"items": len(theirs), "agreement": 1.0 if total == 0 else 2 * matched / total, "aggregation": "simple"}


def _spans(entities: list[dict]) -> list[tuple[str, int, int]]:
    return [(e["entity_group"], int(e["start"]), int(e["end"])) for e in entities]


SPEC = TaskSpec(
    task="token-classification",
    pipeline=TokenClassificationPipeline,
    head="ForTokenClassification",
    auto_class="AutoModelForTokenClassification",
    inputs=(Tensor("text", "BYTES", (-1,)),),
    parameters=(
        Param("aggregation_strategy", str, "none", choices=STRATEGIES, help="how tokens are grouped into entities"),
        Param("ignore_labels", list, None, help="labels left out (default: O)"),
        Param("truncation", bool, True, help="cut over-long text (false: refuse it)"),
    ),
    prepare=prepare,
    gate=Gate(
        hf_task="token-classification",
        items=lambda texts, mask: {"text": texts},
        theirs=lambda hf, items, reference, pooling: [hf(t, aggregation_strategy="simple") for t in items["text"]],
        agreement=_entity_f1,
        params={"aggregation_strategy": "simple"},
    ),
    labels=True,
)
