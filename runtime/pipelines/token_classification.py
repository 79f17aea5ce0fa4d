"""Token classification with the entity grouping rules of transformers' pipeline.

Strategies: none (every token), simple (adjacent tokens with one tag merged), and the word-level
first / average / max, which first force one tag per word and then group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from kiln.runtime.errors import InvalidInput
from kiln.runtime.inputs import check_texts
from kiln.runtime.pipelines.base import Outputs, Pipeline, Prepared, softmax
from tokenizers import Encoding

STRATEGIES = ("none", "simple", "first", "average", "max")


@dataclass
class _Token:
    word: str
    scores: np.ndarray
    start: int
    end: int
    index: int
    is_subword: bool


class TokenClassificationPipeline(Pipeline):
    task = "token-classification"
    sequence_outputs = ("logits",)

    def prepare(
        self,
        texts: str | list[str],
        aggregation_strategy: str = "none",
        ignore_labels: list[str] | None = None,
        truncation: bool = True,
    ) -> Prepared:
        """Answers one list of entities per text."""
        texts = check_texts(texts)
        if aggregation_strategy not in STRATEGIES:
            raise InvalidInput(
                f"aggregation_strategy must be one of {', '.join(STRATEGIES)}, got {aggregation_strategy!r}"
            )
        ignore = ["O"] if ignore_labels is None else ignore_labels
        encodings = self.encoder.tokenize(texts, truncation=truncation)

        def finish(outputs: Outputs) -> list[list[dict[str, Any]]]:
            results = []
            for text, enc, out in zip(texts, encodings, outputs, strict=True):
                tokens = self._tokens(text, enc, softmax(out["logits"]))
                entities = self._aggregate(tokens, aggregation_strategy)
                results.append([e for e in entities if e.get("entity", e.get("entity_group")) not in ignore])
            return results

        return Prepared(encodings, finish)

    def _tokens(self, text: str, enc: Encoding, scores: np.ndarray) -> list[_Token]:
        tokenizer = self.encoder.tokenizer
        prefix = getattr(tokenizer.model, "continuing_subword_prefix", None)
        unk = getattr(tokenizer.model, "unk_token", None)
        unk_id = tokenizer.token_to_id(unk) if unk else None
        tokens = []
        for index, (token_id, special) in enumerate(zip(enc.ids, enc.special_tokens_mask, strict=True)):
            if special:
                continue
            start, end = enc.offsets[index]
            word = tokenizer.id_to_token(token_id)
            reference = text[start:end]
            # wordpiece marks continuations ("##"); otherwise guess from the surrounding characters
            is_subword = (
                (len(word) != len(reference)) if prefix else (start > 0 and " " not in text[start - 1 : start + 1])
            )
            if token_id == unk_id:
                word, is_subword = reference, False
            tokens.append(_Token(word, scores[index], start, end, index, is_subword))
        return tokens

    def _aggregate(self, tokens: list[_Token], strategy: str) -> list[dict[str, Any]]:
        labels = self.manifest.labels
        if strategy in ("none", "simple"):
            entities = []
            for tok in tokens:
                best = int(tok.scores.argmax())
                entities.append(
                    {
                        "entity": labels[best],
                        "score": float(tok.scores[best]),
                        "index": tok.index,
                        "word": tok.word,
                        "start": tok.start,
                        "end": tok.end,
                    }
                )
        else:
            entities = [self._word_entity(group, strategy) for group in _words(tokens)]
        return entities if strategy == "none" else self._group(entities)

    def _word_entity(self, group: list[_Token], strategy: str) -> dict[str, Any]:
        if strategy == "first":
            scores = group[0].scores
        elif strategy == "max":
            scores = max(group, key=lambda t: t.scores.max()).scores
        else:
            scores = np.nanmean(np.stack([t.scores for t in group]), axis=0)
        best = int(scores.argmax())
        return {
            "entity": self.manifest.labels[best],
            "score": float(scores[best]),
            "word": self._join([t.word for t in group]),
            "start": group[0].start,
            "end": group[-1].end,
        }

    def _group(self, entities: list[dict[str, Any]]) -> list[dict[str, Any]]:
        groups: list[list[dict[str, Any]]] = []
        for entity in entities:
            bi, tag = _split_tag(entity["entity"])
            if groups and bi != "B" and _split_tag(groups[-1][-1]["entity"])[1] == tag:
                groups[-1].append(entity)
            else:
                groups.append([entity])
        return [
            {
                "entity_group": group[0]["entity"].split("-", 1)[-1],
                "score": float(np.nanmean([e["score"] for e in group])),
                "word": self._join([e["word"] for e in group]),
                "start": group[0]["start"],
                "end": group[-1]["end"],
            }
            for group in groups
        ]

    def _join(self, words: list[str]) -> str:
        decoder = self.encoder.tokenizer.decoder
        return decoder.decode(words) if decoder is not None else " ".join(words)


def _words(tokens: list[_Token]) -> list[list[_Token]]:
    groups: list[list[_Token]] = []
    for tok in tokens:
        if groups and tok.is_subword:
            groups[-1].append(tok)
        else:
            groups.append([tok])
    return groups


def _split_tag(name: str) -> tuple[str, str]:
    if name.startswith(("B-", "I-")):
        return name[0], name[2:]
    return "I", name
