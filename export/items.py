"""Validation items, encoded exactly as the task's pipeline encodes them, and run through either
side: the ONNX graph (one at a time, or in unsorted padded batches) and the PyTorch original."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from kiln.export.figures import Items
from kiln.export.task_exports import EXPORTS
from kiln.runtime.pipelines import Pipeline
from kiln.runtime.tasks import Texts, spec_for
from kiln.runtime.tokenize import TextEncoder
from tokenizers import Encoding

BATCH = 8


@dataclass
class Inputs:
    """The items of a task made from plain sentences, and the encodings its pipeline makes of them."""

    items: Texts
    encodings: list[Encoding]
    sequence_outputs: tuple[str, ...]

    def batches(self) -> list[list[int]]:
        """Unsorted batches, so padding is exercised as a server would see it."""
        n = len(self.encodings)
        return [list(range(i, min(i + BATCH, n))) for i in range(0, n, BATCH)]

    def alone(self) -> list[list[int]]:
        """Each item in its own call, as a package serves one text."""
        return [[i] for i in range(len(self.encodings))]

    def by_length(self) -> list[list[int]]:
        """Batches of items of about one length: the least padding, where speed matters more than
        exercising it (the work of a long text is most of a padded batch's)."""
        order = sorted(range(len(self.encodings)), key=lambda i: len(self.encodings[i].ids))
        return [order[i : i + BATCH] for i in range(0, len(order), BATCH)]

    def first(self, tokens: int) -> Inputs:
        """The leading items that fit a budget of tokens (at least one), for measurements that rank."""
        lengths = np.cumsum([len(e.ids) for e in self.encodings])
        count = max(1, int(np.searchsorted(lengths, tokens, side="right")))
        return replace(self, items={k: v[:count] for k, v in self.items.items()}, encodings=self.encodings[:count])


def make_inputs(pipe: Pipeline, texts: list[str], mask_token: str | None) -> Inputs:
    spec = spec_for(pipe.task)
    items = EXPORTS[spec.task].gate.items(texts, mask_token)
    prepared = spec.prepare(pipe, items, spec.parse_params(EXPORTS[spec.task].gate.params))
    return Inputs(items, prepared.encodings, pipe.sequence_outputs)


def run_onnx(session: Any, encoder: TextEncoder, inputs: Inputs, outputs: list[str], groups: list[list[int]]) -> Items:
    """Outputs per item, run in the given groups of item indices (Inputs.alone, .batches, .by_length)."""
    items: Items = [{} for _ in inputs.encodings]
    for group in groups:
        batch = encoder.pad([inputs.encodings[i] for i in group])
        values = session.run(outputs, batch.feeds)
        _split(items, group, inputs, dict(zip(outputs, values, strict=True)))
    return items


def run_torch(model: Any, encoder: TextEncoder, inputs: Inputs, outputs: list[str]) -> Items:
    import torch

    items: Items = [{} for _ in inputs.encodings]
    with torch.inference_mode():
        for group in inputs.by_length():  # the least padding: nearest each text alone, and fastest
            batch = encoder.pad([inputs.encodings[i] for i in group])
            result = model(**{k: torch.from_numpy(v) for k, v in batch.feeds.items()})
            _split(items, group, inputs, {name: getattr(result, name).float().numpy() for name in outputs})
    return items


def _split(items: Items, group: list[int], inputs: Inputs, values: dict[str, np.ndarray]) -> None:
    for row, index in enumerate(group):
        length = len(inputs.encodings[index].ids)
        items[index] = {
            name: value[row, :length] if name in inputs.sequence_outputs else value[row]
            for name, value in values.items()
        }
