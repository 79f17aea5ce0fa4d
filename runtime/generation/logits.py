"""Logits processing, one row (one sequence) at a time, in `transformers`' order and with its
meanings, so that greedy and beam answers are token-identical to `generate`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from kiln.runtime.generation.settings import Settings

NEG_INF = -np.inf


@dataclass
class Context:
    """What the processors see of a sequence: the ids so far (the prompt too, for a decoder-only
    model; the decoder ids from the start token, for seq2seq), how many are new, how many may be."""

    ids: list[int]
    generated: int
    allowed: int
    decoder_length: int  # what transformers calls cur_len: the decoder's input length


def process(scores: np.ndarray, context: Context, settings: Settings) -> np.ndarray:
    """The constraints (penalties, bans, forced tokens) on a row of scores, in place."""
    if settings.repetition_penalty != 1.0 and context.ids:
        seen = np.unique(np.asarray(context.ids))
        picked = scores[seen]
        with np.errstate(over="ignore", under="ignore"):  # an extreme penalty may give +-inf; sampling copes
            penalised = np.where(picked < 0, picked * settings.repetition_penalty, picked / settings.repetition_penalty)
        scores[seen] = penalised
    if settings.no_repeat_ngram_size > 0:
        scores[banned_ngram_tokens(context.ids, settings.no_repeat_ngram_size)] = NEG_INF
    if settings.bad_token_ids:
        scores[list(settings.bad_token_ids)] = NEG_INF
    too_short = context.generated < settings.min_new_tokens or context.decoder_length < settings.min_length
    if too_short and settings.eos_token_ids:
        scores[list(settings.eos_token_ids)] = NEG_INF
    if settings.forced_bos_token_id is not None and context.decoder_length == 1:
        _force(scores, settings.forced_bos_token_id)
    if settings.forced_eos_token_id is not None and context.generated == context.allowed - 1:
        _force(scores, settings.forced_eos_token_id)
    return scores


def warp(scores: np.ndarray, settings: Settings) -> np.ndarray:
    """Sampling's reshaping of a row: temperature, then top-k, then top-p (nucleus).

    In float64 and relative to the best score, so that no temperature or penalty the settings
    accept can turn a row into NaN: (score - best) / temperature is never inf - inf. A row where
    penalties overflowed some scores to +inf keeps just those, equally likely (the limit of the
    finite case); NaN scores count as banned."""
    scores = _relative(scores.astype(np.float64))
    if settings.temperature != 1.0:
        scores = scores / settings.temperature
    if 0 < settings.top_k < scores.shape[-1]:
        kth = np.partition(scores, -settings.top_k)[-settings.top_k]
        scores = np.where(scores < kth, NEG_INF, scores)
    if settings.top_p < 1.0:
        order = np.argsort(scores, kind="stable")  # ascending, as transformers sorts
        probs = softmax(scores[order])
        drop = np.cumsum(probs) <= 1 - settings.top_p
        drop[-1] = False  # always keep the most likely token
        scores = scores.copy()
        scores[order[drop]] = NEG_INF
    return scores


def sample(scores: np.ndarray, rng: np.random.Generator) -> int:
    """A token drawn from a warped row; a row with every token banned gives what greedy gives."""
    scores = scores.astype(np.float64)
    if not np.isfinite(scores.max()):
        return int(np.argmax(scores))
    return int(rng.choice(scores.shape[-1], p=softmax(scores)))


def _relative(scores: np.ndarray) -> np.ndarray:
    scores = np.where(np.isnan(scores), NEG_INF, scores)
    best = scores.max()
    if best == np.inf:
        return np.where(scores == np.inf, 0.0, NEG_INF)
    return scores - best if np.isfinite(best) else scores


def softmax(x: np.ndarray) -> np.ndarray:
    shifted = np.exp(x - np.max(x))
    return shifted / shifted.sum()


def log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - np.max(x, axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def banned_ngram_tokens(ids: list[int], size: int) -> list[int]:
    """Tokens that would complete an n-gram already seen (transformers' NoRepeatNGram)."""
    if len(ids) + 1 < size:
        return []
    prefix = tuple(ids[len(ids) - size + 1 :]) if size > 1 else ()
    return [ids[i + size - 1] for i in range(len(ids) - size + 1) if tuple(ids[i : i + size - 1]) == prefix]


def _force(scores: np.ndarray, token: int) -> None:
    scores[:] = NEG_INF
    scores[token] = 0.0
