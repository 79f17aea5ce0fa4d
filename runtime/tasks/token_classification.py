"""token-classification: entities, grouped as transformers' pipeline groups them."""

from __future__ import annotations

from kiln.runtime.pipelines.base import Prepared
from kiln.runtime.pipelines.token_classification import STRATEGIES, TokenClassificationPipeline
from kiln.runtime.tasks.spec import Param, Params, TaskSpec, Tensor, Texts


def prepare(pipe: TokenClassificationPipeline, texts: Texts, params: Params) -> Prepared:
    return pipe.prepare(texts["text"], params["aggregation_strategy"], params["ignore_labels"], params["truncation"])


SPEC = TaskSpec(
    task="token-classification",
    pipeline=TokenClassificationPipeline,
    inputs=(Tensor("text", "BYTES", (-1,)),),
    parameters=(
        Param("aggregation_strategy", str, "none", choices=STRATEGIES, help="how tokens are grouped into entities"),
        Param("ignore_labels", list, None, help="labels left out (default: O)"),
        Param("truncation", bool, True, help="cut over-long text (false: refuse it)"),
    ),
    prepare=prepare,
    labels=True,
)
