"""fill-mask: the likeliest tokens at each mask, optionally among given targets."""

from __future__ import annotations

from typing import Any

import numpy as np
from kiln.runtime.pipelines.base import Prepared
from kiln.runtime.pipelines.fill_mask import FillMaskPipeline
from kiln.runtime.tasks.spec import Gate, Param, Params, TaskSpec, Tensor, Texts


def prepare(pipe: FillMaskPipeline, texts: Texts, params: Params) -> Prepared:
    return pipe.prepare(texts["text"], top_k=params["top_k"], targets=params["targets"])


def _items(texts: list[str], mask: str | None) -> Texts:
    """Each sentence with one word masked (a different position from sentence to sentence)."""
    masked = []
    for index, text in enumerate(texts):
        words = text.split(" ")
        words[index % len(words)] = mask or "[MASK]"
        masked.append(" ".join(words))
    return {"text": masked}


def _theirs(hf: Any, items: Texts, reference: Any, pooling: Any) -> list[Any]:
    return [hf(t, top_k=1, tokenizer_kwargs={"truncation": True})[0] for t in items["text"]]


def _agreement(theirs: list[Any], ours: list[Any]) -> dict[str, Any]:
    same = [a["token"] == b["token"] for a, b in zip(theirs, ours, strict=True)]
    return {"items": len(same), "agreement": float(np.mean(same))}


SPEC = TaskSpec(
    task="fill-mask",
    pipeline=FillMaskPipeline,
    head="ForMaskedLM",
    auto_class="AutoModelForMaskedLM",
    inputs=(Tensor("text", "BYTES", (-1,)),),
    parameters=(
        Param("top_k", int, 5, minimum=1, help="fills per mask"),
        Param("targets", list, None, help="rank only these tokens (default: the vocabulary)"),
    ),
    prepare=prepare,
    gate=Gate(
        hf_task="fill-mask",
        items=_items,
        theirs=_theirs,
        ours=lambda answers: [fills[0] for fills in answers],
        agreement=_agreement,
        params={"top_k": 1},
    ),
)
