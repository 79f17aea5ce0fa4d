"""Fill-mask: the most likely tokens at each mask position, optionally among given targets."""

from __future__ import annotations

from typing import Any

import numpy as np
from kiln.runtime.errors import InvalidInput
from kiln.runtime.inputs import check_texts
from kiln.runtime.pipelines.base import Outputs, Pipeline, Prepared, softmax


class FillMaskPipeline(Pipeline):
    task = "fill-mask"
    sequence_outputs = ("logits",)

    @property
    def mask_token(self) -> str:
        return self.manifest.mask_token or "[MASK]"

    def prepare(self, texts: str | list[str], top_k: int = 5, targets: list[str] | None = None) -> Prepared:
        """Answers, per text, the fills of its mask (a list per mask when it has several)."""
        texts = check_texts(texts)
        if not isinstance(top_k, int) or top_k < 1:
            raise InvalidInput(f"top_k must be a positive integer, got {top_k!r}")
        tokenizer = self.encoder.tokenizer
        mask_id = tokenizer.token_to_id(self.mask_token)
        target_ids = self._target_ids(targets) if targets is not None else None
        encodings = self.encoder.tokenize(texts)
        for index, enc in enumerate(encodings):
            if mask_id not in enc.ids:
                raise InvalidInput(f"text[{index}] has no {self.mask_token} token")

        def finish(outputs: Outputs) -> list[Any]:
            results = []
            for enc, out in zip(encodings, outputs, strict=True):
                positions = [i for i, t in enumerate(enc.ids) if t == mask_id]
                fills = [self._fill(enc.ids, p, out["logits"][p], top_k, target_ids, positions) for p in positions]
                results.append(fills[0] if len(fills) == 1 else fills)
            return results

        return Prepared(encodings, finish)

    def _target_ids(self, targets: list[str]) -> np.ndarray:
        if isinstance(targets, str):
            targets = [targets]
        ids = []
        for target in targets:
            token_id = self.encoder.tokenizer.token_to_id(target)
            if token_id is None:
                encoded = self.encoder.tokenizer.encode(target, add_special_tokens=False).ids
                if not encoded:
                    raise InvalidInput(f"target {target!r} is not in the vocabulary")
                token_id = encoded[0]
            ids.append(token_id)
        return np.array(sorted(set(ids)), dtype=np.int64)

    def _fill(
        self,
        ids: list[int],
        position: int,
        logits: np.ndarray,
        top_k: int,
        target_ids: np.ndarray | None,
        positions: list[int],
    ) -> list[dict[str, Any]]:
        probs = softmax(logits.astype(np.float64))
        candidates = target_ids if target_ids is not None else np.arange(len(probs))
        order = candidates[np.argsort(-probs[candidates], kind="stable")][:top_k]
        tokenizer = self.encoder.tokenizer
        filled = []
        for token_id in order:
            sequence = list(ids)
            sequence[position] = int(token_id)
            filled.append(
                {
                    "score": float(probs[token_id]),
                    "token": int(token_id),
                    "token_str": tokenizer.decode([int(token_id)]),
                    "sequence": tokenizer.decode(sequence, skip_special_tokens=len(positions) == 1),
                }
            )
        return filled
