"""feature-extraction: sentence embeddings, pooled and normalised as the model's config says."""

from __future__ import annotations

from typing import Any

import numpy as np
from kiln.runtime.pipelines.base import Prepared
from kiln.runtime.pipelines.feature_extraction import POOLING_MODES, FeatureExtractionPipeline, normalize, pool
from kiln.runtime.tasks.spec import Gate, Param, Params, TaskSpec, Tensor, Texts


def prepare(pipe: FeatureExtractionPipeline, texts: Texts, params: Params) -> Prepared:
    return pipe.prepare(texts["text"], params["pooling"], params["normalize"], params["truncation"])


def _theirs(hf: Any, items: Texts, reference: list[dict[str, np.ndarray]], pooling: Any) -> list[Any]:
    """No transformers pipeline pools like sentence-transformers: the PyTorch outputs, pooled."""
    vectors = np.stack([pool(item["last_hidden_state"], pooling.mode) for item in reference])
    return list(normalize(vectors) if pooling.normalize else vectors)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def _cosines(theirs: list[Any], ours: list[Any]) -> dict[str, Any]:
    cosines = [cosine(a, b) for a, b in zip(theirs, ours, strict=True)]
    return {"items": len(cosines), "min_cosine": float(min(cosines)), "mean_cosine": float(np.mean(cosines))}


SPEC = TaskSpec(
    task="feature-extraction",
    pipeline=FeatureExtractionPipeline,
    head="Model",
    auto_class="AutoModel",
    inputs=(Tensor("text", "BYTES", (-1,)),),
    parameters=(
        Param("pooling", str, None, choices=POOLING_MODES, help="default: the model's"),
        Param("normalize", bool, None, help="unit length (default: the model's)"),
        Param("truncation", bool, True, help="cut over-long text (false: refuse it)"),
    ),
    prepare=prepare,
    gate=Gate(hf_task=None, items=lambda texts, mask: {"text": texts}, theirs=_theirs, agreement=_cosines),
    pooling=True,
)
