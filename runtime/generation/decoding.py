"""The decoding loop, iteration by iteration, for many sequences at once.

`Decoding` holds the running rows in groups that step together (one group for a decoder-only
model; a cohort per decoder step for seq2seq). `add` prefills new sequences and joins them to a
group at the next step; `step` advances every group by one token; a finished or cancelled sequence
leaves its group at once. In process the pipeline drives it until everything is done; the server's
scheduler drives it forever, adding requests between steps (continuous batching).

A failure is the failing sequences' alone: a row whose token cannot be chosen ends with its error, a
session run that raises ends the group it ran, and a prefill that raises is retried prompt by prompt
so that only the prompt at fault ends. The error travels with the sequence (`Sequence.error`, a
last piece whose finish reason is "error"); nothing raises out of `add` or `step`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from kiln.runtime.generation.detokenize import StreamDecoder
from kiln.runtime.generation.logits import Context, process, sample, warp
from kiln.runtime.generation.sessions import Cache, Decoder, DecoderOnly
from kiln.runtime.generation.settings import Settings

FINISH_LENGTH, FINISH_STOP, FINISH_CANCELLED, FINISH_ERROR = "length", "stop", "cancelled", "error"


@dataclass
class Piece:
    """Generated text, one idea at three sizes: what a decode step gave a sequence (maybe empty while
    a character or a stop string is incomplete), a chunk a protocol streams, or a whole answer.
    `tokens` counts the new tokens its text covers; the last piece of an answer has why it ended and
    the answer's totals (prompt tokens, new tokens, whether the prompt was cut)."""

    text: str
    tokens: int
    finish_reason: str | None = None
    prompt_tokens: int = 0
    generated_tokens: int = 0
    truncated: bool = False

    @classmethod
    def whole(cls, text: str, prompt_tokens: int, tokens: int, finish_reason: str, truncated: bool = False) -> Piece:
        """A whole answer as one piece."""
        return cls(text, tokens, finish_reason, prompt_tokens, tokens, truncated)


@dataclass
class Sequence:
    """One text being generated: its prompt ids, settings and what it has produced so far."""

    prompt: list[int]
    settings: Settings
    allowed: int  # new tokens it may produce
    stream: StreamDecoder
    on_piece: Callable[[Piece], None] = lambda piece: None
    rng: np.random.Generator | None = None
    generated: list[int] = field(default_factory=list)
    text: str = ""  # everything decoded so far, stop strings not yet cut
    emitted: int = 0  # characters of `text` handed out
    finish_reason: str | None = None
    cancelled: bool = False
    decoder_only: bool = True
    error: BaseException | None = None  # why the sequence ended with FINISH_ERROR
    request_id: str = ""  # who asked, for the log line of a failure

    def context(self, start_id: int | None) -> list[int]:
        """The ids logits processors look at: prompt and output (decoder-only), else start and output."""
        return [*self.prompt, *self.generated] if self.decoder_only else [start_id or 0, *self.generated]


@dataclass
class Group:
    sequences: list[Sequence]
    cache: Cache
    last: np.ndarray  # each row's newest token, the next step's input


class Decoding:
    def __init__(self, decoder: Decoder, start_id: int | None = None):
        self.decoder = decoder
        self.start_id = start_id
        self.groups: list[Group] = []
        self.decoder_only = isinstance(decoder, DecoderOnly)

    @property
    def active(self) -> int:
        return sum(len(g.sequences) for g in self.groups)

    def cache_tokens(self) -> int:
        return sum(g.cache.tokens() for g in self.groups)

    def add(self, sequences: list[Sequence]) -> None:
        """Prefill new sequences (together), choose their first tokens, and join them to a group."""
        for sequence in sequences:
            sequence.decoder_only = self.decoder_only
        try:
            logits, cache = self.decoder.prefill([s.prompt for s in sequences])
        except Exception as exc:
            if len(sequences) == 1:
                fail(sequences[0], exc)
                return
            for sequence in sequences:  # find the prompt at fault: the others must not fail with it
                self.add([sequence])
            return
        self._advance(Group(sequences, cache, np.zeros(len(sequences), dtype=np.int64)), logits)

    def step(self) -> None:
        """One token for every running sequence; cancelled ones leave first."""
        groups, self.groups = self.groups, []
        for group in groups:
            try:
                self._step(group)
            except Exception as exc:  # the session run (or the cache) failed: the group it held ends
                for sequence in group.sequences:
                    fail(sequence, exc)

    def _step(self, group: Group) -> None:
        for sequence in group.sequences:
            if sequence.cancelled and sequence.finish_reason is None:
                _finish(sequence, FINISH_CANCELLED, "")
        remaining = _without_finished(self.decoder, group)
        if remaining is not None:
            logits, cache = self.decoder.step(remaining.cache, remaining.last)
            self._advance(Group(remaining.sequences, cache, remaining.last), logits)

    def _advance(self, group: Group, logits: np.ndarray) -> None:
        for row, sequence in enumerate(group.sequences):
            try:
                token = choose(sequence, logits[row], self.start_id)
                group.last[row] = token
                accept(sequence, token)
            except Exception as exc:  # this row's processing or its caller's hand-off: this row alone
                fail(sequence, exc)
        remaining = _without_finished(self.decoder, group)
        if remaining is not None:
            self._join(remaining)

    def _join(self, group: Group) -> None:
        for index, other in enumerate(self.groups):
            if self.decoder.can_join(other.cache, group.cache):
                cache = self.decoder.join(other.cache, group.cache)
                self.groups[index] = Group(
                    other.sequences + group.sequences, cache, np.concatenate([other.last, group.last])
                )
                return
        self.groups.append(group)


def choose(sequence: Sequence, logits: np.ndarray, start_id: int | None) -> int:
    """The next token of one sequence: processed scores, then greedy or sampled."""
    ids = sequence.context(start_id)
    context = Context(ids, len(sequence.generated), sequence.allowed, len(ids))
    scores = process(logits.astype(np.float32, copy=True), context, sequence.settings)
    if sequence.settings.do_sample:
        return sample(warp(scores, sequence.settings), sequence.rng or np.random.default_rng())
    return int(np.argmax(scores))


def accept(sequence: Sequence, token: int) -> None:
    """Record a chosen token, hand out the text it completes, and finish the sequence if it is done."""
    sequence.generated.append(token)
    settings = sequence.settings
    if token in settings.eos_token_ids:
        _finish(sequence, FINISH_STOP, sequence.stream.flush(), tokens=1)
        return
    sequence.text += sequence.stream.push(token)
    if settings.stop:
        hit = _first_stop(sequence.text, settings.stop, sequence.emitted)
        if hit is not None:
            _finish(sequence, FINISH_STOP, "", tokens=1)
            return
    if len(sequence.generated) >= sequence.allowed:
        _finish(sequence, FINISH_LENGTH, sequence.stream.flush(), tokens=1)
        return
    _emit(sequence, _safe_end(sequence.text, settings.stop), tokens=1)


def fail(sequence: Sequence, error: BaseException) -> None:
    """End a sequence with an error; its caller gets a last piece saying so."""
    if sequence.finish_reason is not None:
        return
    sequence.finish_reason, sequence.error = FINISH_ERROR, error
    with contextlib.suppress(Exception):  # a caller that cannot take the piece has gone already
        sequence.on_piece(Piece("", 0, FINISH_ERROR))


def _emit(sequence: Sequence, upto: int, tokens: int, finish: str | None = None) -> None:
    piece = sequence.text[sequence.emitted : upto]
    sequence.emitted = max(sequence.emitted, upto)
    sequence.on_piece(Piece(piece, tokens, finish))


def _finish(sequence: Sequence, reason: str, tail: str, tokens: int = 0) -> None:
    sequence.text += tail
    if (
        sequence.settings.stop
        and (hit := _first_stop(sequence.text, sequence.settings.stop, sequence.emitted)) is not None
    ):
        sequence.text, reason = sequence.text[:hit], FINISH_STOP
    sequence.finish_reason = reason
    _emit(sequence, len(sequence.text), tokens, reason)


def _first_stop(text: str, stops: tuple[str, ...], emitted: int) -> int | None:
    """Where the first stop string starts, looking only where a new one could be."""
    start = max(emitted - max(len(s) for s in stops), 0)
    hits = [found for stop in stops if (found := text.find(stop, start)) >= 0]
    return min(hits) if hits else None


def _safe_end(text: str, stops: tuple[str, ...]) -> int:
    """How much of the text can be handed out: all but a tail that may begin a stop string."""
    for keep in range(min(len(text), max((len(s) for s in stops), default=1) - 1), 0, -1):
        if any(stop.startswith(text[-keep:]) for stop in stops):
            return len(text) - keep
    return len(text)


def _without_finished(decoder: Decoder, group: Group) -> Group | None:
    keep = [row for row, s in enumerate(group.sequences) if s.finish_reason is None]
    if not keep:
        return None
    if len(keep) == len(group.sequences):
        return group
    order, cache = group.cache.compact(keep)
    return Group([group.sequences[row] for row in order], decoder.trim(cache), group.last[order])
