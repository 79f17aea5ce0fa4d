"""feature-extraction: sentence embeddings, pooled and normalised as the model's config says."""

from __future__ import annotations

from kiln.runtime.pipelines.base import Prepared
from kiln.runtime.pipelines.feature_extraction import POOLING_MODES, FeatureExtractionPipeline
from kiln.runtime.tasks.spec import Param, Params, TaskSpec, Tensor, Texts


def prepare(pipe: FeatureExtractionPipeline, texts: Texts, params: Params) -> Prepared:
    return pipe.prepare(texts["text"], params["pooling"], params["normalize"], params["truncation"])


SPEC = TaskSpec(
    task="feature-extraction",
    pipeline=FeatureExtractionPipeline,
    inputs=(Tensor("text", "BYTES", (-1,)),),
    parameters=(
        Param("pooling", str, None, choices=POOLING_MODES, help="default: the model's"),
        Param("normalize", bool, None, help="unit length (default: the model's)"),
        Param("truncation", bool, True, help="cut over-long text (false: refuse it)"),
    ),
    prepare=prepare,
)
