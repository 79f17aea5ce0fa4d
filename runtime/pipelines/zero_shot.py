"""Zero-shot classification with an NLI model: each candidate label becomes a hypothesis."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
from kiln.runtime.errors import InvalidInput, PackageError
from kiln.runtime.inputs import check_text, check_texts
from kiln.runtime.pipelines.base import Outputs, Pipeline, Prepared, softmax
from tokenizers import Tokenizer

DEFAULT_TEMPLATE = "This example is {}."


class ZeroShotClassificationPipeline(Pipeline):
    task = "zero-shot-classification"

    @property
    def entailment_id(self) -> int:
        """The label whose name starts with 'entail', as transformers finds it (else the last)."""
        for index, label in enumerate(self.manifest.labels):
            if label.lower().startswith("entail"):
                return index
        return -1

    def prepare(
        self,
        texts: str | list[str],
        candidate_labels: str | list[str],
        hypothesis_template: str = DEFAULT_TEMPLATE,
        multi_label: bool = False,
    ) -> Prepared:
        """Answers, per text, the candidate labels ranked by entailment."""
        texts = check_texts(texts)
        labels = _parse_labels(candidate_labels)
        if hypothesis_template.format(labels[0]) == hypothesis_template:
            raise InvalidInput(f"hypothesis_template {hypothesis_template!r} has no {{}} for the label")
        if len(self.manifest.labels) < 2:
            raise PackageError("zero-shot classification needs an NLI model (entailment / contradiction labels)")
        hypotheses = [hypothesis_template.format(label) for label in labels]
        tokenizer = _first_only_tokenizer(self.encoder.tokenizer.to_str(), self.encoder.max_length)
        pairs = [(text, hypothesis) for text in texts for hypothesis in hypotheses]

        def finish(outputs: Outputs) -> list[dict[str, Any]]:
            logits = np.stack([o["logits"] for o in outputs]).reshape(len(texts), len(labels), -1)
            return [self._rank(text, labels, row, multi_label) for text, row in zip(texts, logits, strict=True)]

        return Prepared(tokenizer.encode_batch(pairs), finish)

    def _rank(self, text: str, labels: list[str], logits: np.ndarray, multi_label: bool) -> dict[str, Any]:
        entail = self.entailment_id
        if multi_label or len(labels) == 1:
            contradiction = -1 if entail == 0 else 0
            scores = softmax(logits[:, [contradiction, entail]])[:, 1]
        else:
            scores = softmax(logits[:, entail])
        order = list(reversed(scores.argsort()))
        return {"sequence": text, "labels": [labels[i] for i in order], "scores": [float(scores[i]) for i in order]}


def _parse_labels(candidate_labels: object) -> list[str]:
    if isinstance(candidate_labels, str):
        labels = [label.strip() for label in candidate_labels.split(",") if label.strip()]
    elif isinstance(candidate_labels, list | tuple):
        labels = [check_text(label, f"candidate_labels[{i}]") for i, label in enumerate(candidate_labels)]
    else:
        raise InvalidInput("candidate_labels must be a list of strings or a comma-separated string")
    if not labels:
        raise InvalidInput("candidate_labels is empty")
    return labels


@lru_cache(maxsize=4)
def _first_only_tokenizer(serialized: str, max_length: int) -> Tokenizer:
    """Truncate the text, never the hypothesis (it carries the label)."""
    tokenizer = Tokenizer.from_str(serialized)
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length, strategy="only_first")
    return tokenizer
