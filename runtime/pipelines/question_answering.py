"""Extractive question answering over contexts of any length (overlapping windows, doc_stride)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
from kiln.runtime.errors import InvalidInput
from kiln.runtime.inputs import check_pairs, check_texts
from kiln.runtime.pipelines.base import Outputs, Pipeline, Prepared
from tokenizers import Encoding, Tokenizer


class QuestionAnsweringPipeline(Pipeline):
    task = "question-answering"
    sequence_outputs = ("start_logits", "end_logits")

    def prepare(
        self,
        question: str | list[str],
        context: str | list[str],
        top_k: int = 1,
        max_answer_len: int = 15,
        handle_impossible_answer: bool = False,
        max_seq_len: int | None = None,
        doc_stride: int | None = None,
    ) -> Prepared:
        """Answers, per question, the best span (or the top_k best) over all windows of its context."""
        questions = check_texts(question, "question")
        contexts = check_pairs(questions, context, "context")
        max_seq_len = max_seq_len or min(self.encoder.max_length, 384)
        doc_stride = min(max_seq_len // 2, 128) if doc_stride is None else doc_stride
        _check_settings(top_k, max_answer_len, max_seq_len, doc_stride, self.encoder.max_length)
        windows = self._windows(questions, contexts, max_seq_len, doc_stride)

        def finish(outputs: Outputs) -> list[Any]:
            by_window = iter(outputs)
            answers = []
            for ctx, spans in zip(contexts, windows, strict=True):
                per_span = [next(by_window) for _ in spans]
                answers.append(_answers(ctx, spans, per_span, top_k, max_answer_len, handle_impossible_answer))
            return [a[0] if top_k == 1 else a for a in answers]

        return Prepared([w for ws in windows for w in ws], finish)

    def _windows(
        self, questions: list[str], contexts: list[str], max_seq_len: int, doc_stride: int
    ) -> list[list[Encoding]]:
        tokenizer = _windowing_tokenizer(self.encoder.tokenizer.to_str(), max_seq_len, doc_stride)
        windows = []
        for index, enc in enumerate(tokenizer.encode_batch(list(zip(questions, contexts, strict=True)))):
            spans = [enc, *enc.overflowing]
            if not any(1 in s.sequence_ids for s in spans):
                raise InvalidInput(
                    f"question[{index}] leaves no room for the context in {max_seq_len} tokens; shorten it"
                )
            windows.append(spans)
        return windows


@lru_cache(maxsize=8)
def _windowing_tokenizer(serialized: str, max_seq_len: int, doc_stride: int) -> Tokenizer:
    """A tokenizer that cuts only the context into overlapping windows (cached per setting)."""
    tokenizer = Tokenizer.from_str(serialized)
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_seq_len, stride=doc_stride, strategy="only_second")
    return tokenizer


def _check_settings(top_k: int, max_answer_len: int, max_seq_len: int, doc_stride: int, limit: int) -> None:
    if not isinstance(top_k, int) or top_k < 1:
        raise InvalidInput(f"top_k must be a positive integer, got {top_k!r}")
    if not isinstance(max_answer_len, int) or max_answer_len < 1:
        raise InvalidInput(f"max_answer_len must be a positive integer, got {max_answer_len!r}")
    if max_seq_len > limit:
        raise InvalidInput(f"max_seq_len {max_seq_len} is over the model's limit of {limit}")
    if not 0 <= doc_stride < max_seq_len // 2 + 1:
        raise InvalidInput(f"doc_stride must be between 0 and max_seq_len/2 ({max_seq_len // 2}), got {doc_stride}")


def _answers(
    context: str,
    spans: list[Encoding],
    outputs: list[dict[str, np.ndarray]],
    top_k: int,
    max_answer_len: int,
    handle_impossible: bool,
) -> list[dict[str, Any]]:
    """Best answers over all windows. As in transformers, more candidates than asked for are
    taken (word alignment can make two spans one answer) and equal answers add their scores."""
    by_text: dict[str, dict[str, Any]] = {}
    null_score = 1e6
    for enc, out in zip(spans, outputs, strict=True):
        allowed = np.array([s == 1 for s in enc.sequence_ids], dtype=bool)
        start = _masked_probs(out["start_logits"], allowed)
        end = _masked_probs(out["end_logits"], allowed)
        if handle_impossible:
            null_score = min(null_score, float(start[0] * end[0]))
        start[0] = end[0] = 0.0
        for s, e, score in _best_spans(start, end, top_k * 2 + 10, max_answer_len, allowed):
            char_start, char_end = _char_span(enc, s, e)
            text = context[char_start:char_end]
            if text in by_text:
                by_text[text]["score"] += score
            else:
                by_text[text] = {"score": score, "start": char_start, "end": char_end, "answer": text}
    answers = list(by_text.values())
    if handle_impossible:
        answers.append({"score": null_score, "start": 0, "end": 0, "answer": ""})
    return sorted(answers, key=lambda a: a["score"], reverse=True)[:top_k]


def _masked_probs(logits: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Softmax over the context tokens (and the CLS token, which stands for 'no answer')."""
    keep = allowed.copy()
    keep[0] = True  # transformers un-masks the first (CLS) position for the null answer
    masked = np.where(keep, logits.astype(np.float64), -10000.0)
    exp = np.exp(masked - masked.max())
    return exp / exp.sum()


def _best_spans(
    start: np.ndarray, end: np.ndarray, top_k: int, max_answer_len: int, allowed: np.ndarray
) -> list[tuple[int, int, float]]:
    """The top_k spans by start x end probability, then those inside the context (the same
    order of operations as transformers, so both drop the same candidates)."""
    scores = np.tril(np.triu(np.outer(start, end)), max_answer_len - 1)
    flat = scores.ravel()
    order = np.argsort(-flat, kind="stable")[:top_k]
    picked = []
    for flat_index in order:
        s, e = divmod(int(flat_index), scores.shape[1])
        if allowed[s] and allowed[e]:
            picked.append((s, e, float(flat[flat_index])))
    return picked


def _char_span(enc: Encoding, start_token: int, end_token: int) -> tuple[int, int]:
    """Widen a token span to whole words of the context, as transformers does by default."""
    start_word, end_word = enc.token_to_word(start_token), enc.token_to_word(end_token)
    if start_word is not None and end_word is not None:
        start_chars = enc.word_to_chars(start_word, 1)
        end_chars = enc.word_to_chars(end_word, 1)
        if start_chars is not None and end_chars is not None:
            return start_chars[0], end_chars[1]
    return enc.offsets[start_token][0], enc.offsets[end_token][1]
