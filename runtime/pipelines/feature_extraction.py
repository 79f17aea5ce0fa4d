"""Sentence embeddings: token vectors pooled as the model's sentence-transformers config says."""

from __future__ import annotations

import numpy as np
from kiln.runtime.errors import InvalidInput
from kiln.runtime.inputs import check_texts
from kiln.runtime.manifest import Pooling
from kiln.runtime.pipelines.base import Outputs, Pipeline, Prepared

POOLING_MODES = ("mean", "cls", "max")


def pool(tokens: np.ndarray, mode: str) -> np.ndarray:
    """Pool one text's token vectors [L, D] (padding already trimmed) into one vector [D]."""
    if mode == "mean":
        return tokens.mean(axis=0)
    if mode == "cls":
        return tokens[0]
    if mode == "max":
        return tokens.max(axis=0)
    raise InvalidInput(f"pooling must be one of {', '.join(POOLING_MODES)}, got {mode!r}")


def normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


class FeatureExtractionPipeline(Pipeline):
    task = "feature-extraction"
    sequence_outputs = ("last_hidden_state",)

    def prepare(
        self,
        texts: str | list[str],
        pooling: str | None = None,
        normalize_embeddings: bool | None = None,
        truncation: bool = True,
    ) -> Prepared:
        """Answers a float32 array [N, D], one embedding per text."""
        texts = check_texts(texts)
        default = self.manifest.pooling or Pooling()
        mode = pooling or default.mode
        if mode not in POOLING_MODES:
            raise InvalidInput(f"pooling must be one of {', '.join(POOLING_MODES)}, got {mode!r}")
        do_normalize = default.normalize if normalize_embeddings is None else normalize_embeddings

        def finish(outputs: Outputs) -> np.ndarray:
            vectors = np.stack([pool(o["last_hidden_state"].astype(np.float32), mode) for o in outputs])
            return (normalize(vectors) if do_normalize else vectors).astype(np.float32)

        return Prepared(self.encoder.tokenize(texts, truncation=truncation), finish)
