"""One pipeline per task; `PIPELINES` maps the manifest's task name to its class."""

from kiln.runtime.pipelines.base import Pipeline
from kiln.runtime.pipelines.feature_extraction import FeatureExtractionPipeline
from kiln.runtime.pipelines.fill_mask import FillMaskPipeline
from kiln.runtime.pipelines.question_answering import QuestionAnsweringPipeline
from kiln.runtime.pipelines.text_classification import TextClassificationPipeline
from kiln.runtime.pipelines.token_classification import TokenClassificationPipeline
from kiln.runtime.pipelines.zero_shot import ZeroShotClassificationPipeline

PIPELINES: dict[str, type[Pipeline]] = {
    cls.task: cls
    for cls in (
        TextClassificationPipeline,
        TokenClassificationPipeline,
        QuestionAnsweringPipeline,
        FeatureExtractionPipeline,
        FillMaskPipeline,
        ZeroShotClassificationPipeline,
    )
}

__all__ = ["PIPELINES", "Pipeline"]
