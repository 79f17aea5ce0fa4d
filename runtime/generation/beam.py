"""Beam search for one prompt, a numpy transcription of `transformers`' vectorized `_beam_search`
(4.5x): the same candidates kept (2 x beams), the same length penalty on finished hypotheses,
the same early-stopping heuristics, so answers are token-identical to `generate(num_beams=...)`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from kiln.runtime.generation.logits import Context, log_softmax, process
from kiln.runtime.generation.sessions import Decoder, DecoderOnly
from kiln.runtime.generation.settings import Settings

_FAR = -1.0e9


def beam_search(
    decoder: Decoder,
    prompt: list[int],
    settings: Settings,
    allowed: int,
    start_id: int | None,
    check: Callable[[], None] = lambda: None,
) -> list[int]:
    """The best hypothesis' new token ids (its eos included, as transformers returns it). `check`
    runs before every step: a server stops a search whose caller left or whose deadline passed."""
    beams = settings.num_beams
    decoder_only = isinstance(decoder, DecoderOnly)
    prefix = list(prompt) if decoder_only else [start_id or 0]
    max_length = len(prefix) + allowed
    keep = max(2, 1 + len(settings.eos_token_ids)) * beams
    running = [list(prefix) for _ in range(beams)]
    running_scores = np.array([0.0] + [_FAR] * (beams - 1))
    finished: list[tuple[float, list[int]]] = []  # (score, ids), at most `beams`, best first
    improvable = True
    check()
    logits, cache = decoder.prefill([prompt])
    cache = cache.select([0] * beams)
    logits = np.repeat(logits, beams, axis=0)
    cur_len = len(prefix)
    while True:
        check()
        scores = np.stack([_processed(logits[b], running[b], len(prefix), allowed, settings) for b in range(beams)])
        flat = (scores + running_scores[:, None]).reshape(-1)
        order = np.argsort(-flat, kind="stable")[:keep]
        candidates = [(flat[i], int(i // scores.shape[1]), int(i % scores.shape[1])) for i in order]
        ends = [tok in settings.eos_token_ids or cur_len + 1 >= max_length for _, _, tok in candidates]
        # the running beams: the best candidates that did not just end
        alive = sorted(range(keep), key=lambda k: -(candidates[k][0] + (_FAR if ends[k] else 0.0)))[:beams]
        # finished hypotheses: only the top `beams` candidates may finish, with the length penalty
        if improvable and not (len(finished) == beams and settings.early_stopping is True):
            for k in range(beams):
                if ends[k]:
                    score, beam, tok = candidates[k]
                    penalised = score / ((cur_len + 1 - len(prefix)) ** settings.length_penalty)
                    finished.append((penalised, [*running[beam], tok]))
            finished = sorted(finished, key=lambda f: -f[0])[:beams]
        new_running = [[*running[candidates[k][1]], candidates[k][2]] for k in alive]
        running_scores = np.array([candidates[k][0] + (_FAR if ends[k] else 0.0) for k in alive])
        source_beams = [candidates[k][1] for k in alive]
        running = new_running
        cur_len += 1
        improvable = improvable and _improvable(
            running_scores, finished, beams, cur_len, max_length, len(prefix), settings
        )
        all_done = len(finished) == beams and settings.early_stopping is True
        if not improvable or all_done or all(ends[k] for k in alive) or cur_len >= max_length:
            break
        cache = cache.select(source_beams)
        last = np.array([seq[-1] for seq in running], dtype=np.int64)
        logits, cache = decoder.step(cache, last)
    best = finished[0][1] if finished else running[0]
    return best[len(prefix) :]


def _processed(logits: np.ndarray, ids: list[int], prefix: int, allowed: int, settings: Settings) -> np.ndarray:
    scores = log_softmax(logits.astype(np.float32))
    context = Context(ids, len(ids) - prefix, allowed, len(ids))
    return process(scores, context, settings)


def _improvable(
    running_scores: np.ndarray,
    finished: list[tuple[float, list[int]]],
    beams: int,
    cur_len: int,
    max_length: int,
    prefix: int,
    settings: Settings,
) -> bool:
    """transformers' early-stop heuristic: can the best running beam still beat the worst finished one?"""
    if settings.early_stopping == "never" and settings.length_penalty > 0.0:
        length = max_length - prefix
    else:
        length = cur_len - prefix
    best_running = running_scores[0] / (length**settings.length_penalty)
    worst_finished = min(f[0] for f in finished) if len(finished) == beams else _FAR
    return bool(best_running > worst_finished)
