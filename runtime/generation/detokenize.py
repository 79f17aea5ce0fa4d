"""Text out of token ids, as `transformers` decodes it, and incrementally for streaming.

Byte-level BPE splits a Korean character (three UTF-8 bytes) across tokens, and a decoder may
join pieces with spaces that depend on the neighbours, so a token cannot be decoded alone. The
streaming decoder (as TGI's) decodes a short window of ids with and without the newest ones and
emits only the difference, and only once it no longer ends in a half character (U+FFFD).
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer

REPLACEMENT = "\ufffd"
_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))  # fmt: skip


@dataclass(frozen=True)
class Detokenizer:
    tokenizer: Tokenizer
    clean_up_spaces: bool = False  # tokenizer_config.json's clean_up_tokenization_spaces

    def decode(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if self.clean_up_spaces:
            for before, after in _CLEANUPS:
                text = text.replace(before, after)
        return text


class StreamDecoder:
    """Emits the text each new token completes; what `flush` returns at the end makes the pieces
    add up to the whole answer."""

    WINDOW = 5  # ids of context before the unread ones, enough for a decoder's spacing rules

    def __init__(self, detokenizer: Detokenizer, context: list[int] | None = None):
        self.detokenizer = detokenizer
        self.ids = list(context or [])
        self.prefix = max(len(self.ids) - self.WINDOW, 0)
        self.read = len(self.ids)

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        seen = self.detokenizer.decode(self.ids[self.prefix : self.read])
        now = self.detokenizer.decode(self.ids[self.prefix :])
        if len(now) <= len(seen) or (now.endswith(REPLACEMENT) and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(seen) :]
