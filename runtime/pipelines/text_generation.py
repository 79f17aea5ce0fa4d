"""Generation pipelines: what the `transformers` pipelines return (`generated_text`,
`summary_text`, `translation_text`), by the lean runtime's decoding loop; `stream` hands out the
text as it is generated."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from kiln.runtime.generation.beam import beam_search
from kiln.runtime.generation.decoding import FINISH_LENGTH, FINISH_STOP, Decoding, Piece, accept
from kiln.runtime.generation.package import Generator


class GenerationPipeline:
    task = "text2text-generation"
    output_key = "generated_text"

    def __init__(self, generator: Generator, batch_size: int = 8):
        self.generator = generator
        self.manifest = generator.manifest
        self.batch_size = batch_size

    def __call__(self, inputs: str | list[str], **params: Any) -> Any:
        """As the transformers pipeline: a list of one dict for a text, a list of those for a list."""
        full = params.pop("return_full_text", self.generator.decoder_only) and self.generator.decoder_only
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        answers = self.generate(texts, params)
        results = [[{self.output_key: (t if full else "") + a.text}] for t, a in zip(texts, answers, strict=True)]
        return results[0] if isinstance(inputs, str) else results

    def generate(self, texts: list[str], params: dict[str, Any]) -> list[Piece]:
        params = dict(params)
        truncate = bool(params.pop("truncate", False))
        special = params.pop("add_special_tokens", True) is not False
        settings = self.generator.settings(params)
        prompts = [self.generator.tokenize(text, truncate, special) for text in texts]
        if settings.num_beams > 1:
            return [self.beam(ids, settings, cut) for ids, cut in prompts]
        sequences = [self.generator.sequence(ids, settings, lambda piece: None) for ids, _ in prompts]
        decoding = Decoding(self.generator.decoder, self.generator.start_id)
        for start in range(0, len(sequences), self.batch_size):
            decoding.add(sequences[start : start + self.batch_size])
            while decoding.active:
                decoding.step()
        failed = next((s.error for s in sequences if s.error is not None), None)
        if failed is not None:
            raise failed
        return [
            Piece.whole(s.text, len(s.prompt), len(s.generated), s.finish_reason or FINISH_LENGTH, cut)
            for s, (_, cut) in zip(sequences, prompts, strict=True)
        ]

    def stream(self, text: str, **params: Any) -> Iterator[Piece]:
        """The text piece by piece as it is generated (greedy or sampled); the last piece carries
        the finish reason. Pieces add up to what calling the pipeline returns."""
        truncate = bool(params.pop("truncate", False))
        special = params.pop("add_special_tokens", True) is not False
        settings = self.generator.settings(params)
        ids, _ = self.generator.tokenize(text, truncate, special)
        pieces: list[Piece] = []
        sequence = self.generator.sequence(ids, settings, pieces.append)
        decoding = Decoding(self.generator.decoder, self.generator.start_id)
        decoding.add([sequence])
        while True:
            if sequence.error is not None:
                raise sequence.error
            yield from pieces
            pieces.clear()
            if not decoding.active:
                return
            decoding.step()

    def beam(self, ids: list[int], settings: Any, cut: bool, check: Callable[[], None] = lambda: None) -> Piece:
        """One prompt's beam search answer; `check` runs every step and may raise to stop it."""
        sequence = self.generator.sequence(ids, settings, lambda piece: None)
        tokens = beam_search(self.generator.decoder, ids, settings, sequence.allowed, self.generator.start_id, check)
        for token in tokens:
            if sequence.finish_reason is None:
                accept(sequence, token)
        reason = sequence.finish_reason or (
            FINISH_STOP if tokens and tokens[-1] in settings.eos_token_ids else FINISH_LENGTH
        )
        return Piece.whole(sequence.text, len(ids), len(tokens), reason, cut)


class TextGenerationPipeline(GenerationPipeline):
    task = "text-generation"


class SummarizationPipeline(GenerationPipeline):
    task = "summarization"
    output_key = "summary_text"


class TranslationPipeline(GenerationPipeline):
    task = "translation"
    output_key = "translation_text"
