"""fill-mask: the likeliest tokens at each mask, optionally among given targets."""

from __future__ import annotations

from kiln.runtime.pipelines.base import Prepared
from kiln.runtime.pipelines.fill_mask import FillMaskPipeline
from kiln.runtime.tasks.spec import Param, Params, TaskSpec, Tensor, Texts


def prepare(pipe: FillMaskPipeline, texts: Texts, params: Params) -> Prepared:
    return pipe.prepare(texts["text"], top_k=params["top_k"], targets=params["targets"])


SPEC = TaskSpec(
    task="fill-mask",
    pipeline=FillMaskPipeline,
    inputs=(Tensor("text", "BYTES", (-1,)),),
    parameters=(
        Param("top_k", int, 5, minimum=1, help="fills per mask"),
        Param("targets", list, None, help="rank only these tokens (default: the vocabulary)"),
    ),
    prepare=prepare,
)
