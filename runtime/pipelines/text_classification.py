"""Text classification (single texts and pairs, single- and multi-label), like transformers'."""

from __future__ import annotations

from typing import Any

import numpy as np
from kiln.runtime.errors import InvalidInput
from kiln.runtime.inputs import check_pairs, check_texts
from kiln.runtime.pipelines.base import Pipeline, Prepared, sigmoid, softmax

FUNCTIONS = ("softmax", "sigmoid", "none")


class TextClassificationPipeline(Pipeline):
    task = "text-classification"

    def default_function(self) -> str:
        """The same rule transformers uses: multi-label or a single logit means sigmoid."""
        if self.manifest.problem_type == "multi_label_classification" or len(self.manifest.labels) == 1:
            return "sigmoid"
        return "softmax"

    def prepare_scores(
        self, texts: str | list[str], text_pair: str | list[str] | None = None, truncation: bool = True
    ) -> Prepared:
        """A request whose answer is the raw logits [N, C] and, per text, whether it was truncated."""
        texts = check_texts(texts)
        pairs = check_pairs(texts, text_pair) if text_pair is not None else None
        encodings = self.encoder.tokenize(texts, pairs, truncation=truncation)
        truncated = [bool(e.overflowing) for e in encodings]
        return Prepared(encodings, lambda outputs: (np.stack([o["logits"] for o in outputs]), truncated))

    def logits(
        self, texts: str | list[str], text_pair: str | list[str] | None = None, truncation: bool = True
    ) -> tuple[np.ndarray, list[bool]]:
        """Raw logits, and for each text whether it was truncated."""
        return self.run(self.prepare_scores(texts, text_pair, truncation))

    def prepare(
        self,
        texts: str | list[str],
        text_pair: str | list[str] | None = None,
        top_k: int | None = 1,
        function_to_apply: str | None = None,
        truncation: bool = True,
    ) -> Prepared:
        function = self._function(function_to_apply)
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise InvalidInput(f"top_k must be a positive integer or None, got {top_k!r}")
        scores = self.prepare_scores(texts, text_pair, truncation)
        return Prepared(scores.encodings, lambda outputs: self.rank(*scores.finish(outputs), top_k, function))

    def rank(
        self, logits: np.ndarray, truncated: list[bool], top_k: int | None = 1, function_to_apply: str | None = None
    ) -> list[Any]:
        """Labels and scores from logits already computed (a caller that needs both runs the model once)."""
        function = self._function(function_to_apply)
        scores = {"softmax": softmax, "sigmoid": sigmoid, "none": lambda x: x}[function](logits)
        return [self._rank(row, top_k, cut) for row, cut in zip(scores, truncated, strict=True)]

    def _function(self, name: str | None) -> str:
        function = name or self.default_function()
        if function not in FUNCTIONS:
            raise InvalidInput(f"function_to_apply must be one of {', '.join(FUNCTIONS)}, got {function!r}")
        return function

    def _rank(self, scores: np.ndarray, top_k: int | None, truncated: bool) -> Any:
        order = np.argsort(-scores, kind="stable")
        ranked = [{"label": self.manifest.labels[i], "score": float(scores[i])} for i in order]
        if truncated:
            for item in ranked:
                item["truncated"] = True
        if top_k == 1:
            return ranked[0]
        return ranked if top_k is None else ranked[:top_k]
