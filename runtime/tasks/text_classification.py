"""text-classification: labels for single texts and pairs, multi-label or not."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from kiln.runtime.pipelines.base import Prepared
from kiln.runtime.pipelines.text_classification import FUNCTIONS, TextClassificationPipeline
from kiln.runtime.tasks.spec import Param, Params, TaskSpec, Tensor, Texts


@dataclass
class Classified:
    ranked: list[list[dict[str, Any]]]  # every label, best first, per text
    logits: np.ndarray


def prepare(pipe: TextClassificationPipeline, texts: Texts, params: Params) -> Prepared:
    scores = pipe.prepare_scores(texts["text"], texts.get("text_pair"), params["truncation"])
    function = params["function_to_apply"]

    def finish(outputs: Any) -> Classified:
        logits, truncated = scores.finish(outputs)
        return Classified(pipe.rank(logits, truncated, top_k=None, function_to_apply=function), logits)

    return Prepared(scores.encodings, finish)


SPEC = TaskSpec(
    task="text-classification",
    pipeline=TextClassificationPipeline,
    inputs=(Tensor("text", "BYTES", (-1,)), Tensor("text_pair", "BYTES", (-1,), optional=True)),
    parameters=(
        Param(
            "top_k",
            int,
            1,
            minimum=1,
            special=(-1, "all"),
            help="labels per text, -1 for all (KServe: label and score [N, k])",
        ),
        Param("function_to_apply", str, None, choices=FUNCTIONS, help="default: the model's (softmax or sigmoid)"),
        Param("truncation", bool, True, help="cut over-long text (false: refuse it)"),
    ),
    prepare=prepare,
    labels=True,
)
