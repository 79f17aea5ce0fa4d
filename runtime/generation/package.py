"""A generation package loaded: its sessions, tokenizer, default settings, and how a prompt
becomes a sequence to decode."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from kiln.runtime.cpu import check_int8_cpus
from kiln.runtime.errors import InputTooLong, InvalidInput, PackageError
from kiln.runtime.generation.chat import ChatTemplate, load_chat_template
from kiln.runtime.generation.decoding import Piece, Sequence
from kiln.runtime.generation.detokenize import Detokenizer, StreamDecoder
from kiln.runtime.generation.sessions import Decoder, load_decoder
from kiln.runtime.generation.settings import Settings, from_generation_config, prompt_prefix, with_request
from kiln.runtime.manifest import Manifest, inside, read_manifest, verify_files
from kiln.runtime.package import read_json
from kiln.runtime.session import PROVIDERS, SessionOptions, cache_device, create_session, resolve_provider
from tokenizers import Tokenizer


@dataclass
class Generator:
    directory: Path
    manifest: Manifest
    tokenizer: Tokenizer
    detokenizer: Detokenizer
    decoder: (
        Decoder | None
    )  # None: a front-end process's copy (`load_generator(sessions=False)`), which decodes nothing
    defaults: Settings
    max_positions: int  # decoder positions (decoder-only: prompt and output together)
    max_source: int  # the encoder's limit (seq2seq); the prompt's otherwise
    sessions: dict[str, Any] = field(default_factory=dict)  # role -> onnxruntime session
    prefix: str = ""  # put before every prompt, as the transformers pipeline does (t5's "summarize: ")
    bos_id: int | None = None  # where a decoder-only model starts when the prompt has no tokens
    chat_template: ChatTemplate | None = None  # chat messages to a prompt (OpenAI's chat completions)

    @property
    def decoder_only(self) -> bool:
        return self.manifest.generation["layout"] == "decoder-only"

    @property
    def start_id(self) -> int | None:
        return None if self.decoder_only else self.manifest.generation["decoder_start_token_id"]

    def settings(self, params: Mapping[str, Any]) -> Settings:
        return with_request(self.defaults, params, self.max_positions)

    def tokenize(self, text: str, truncate: bool, special_tokens: bool = True) -> tuple[list[int], bool]:
        """The prompt's ids, refused or cut (keeping its end for a decoder, its start for an
        encoder) when over the model's limit; the flag says whether it was cut. A rendered chat
        template holds its special tokens already (`special_tokens=False`, as apply_chat_template)."""
        ids = self.tokenizer.encode(self.prefix + text, add_special_tokens=special_tokens).ids
        if not ids:  # transformers' generate starts a prompt-less sequence from the bos token
            if self.decoder_only and self.bos_id is not None:
                return [self.bos_id], False
            raise InvalidInput("prompt is empty (it has no tokens) and the model has no bos token to start from")
        limit = self.max_source if not self.decoder_only else self.max_positions - 1
        if len(ids) <= limit:
            return ids, False
        if not truncate:
            raise InputTooLong(
                f"prompt is {len(ids)} tokens; the model takes at most {limit} (pass truncate=true to cut it)"
            )
        return (ids[-limit:] if self.decoder_only else ids[: limit - 1] + ids[-1:]), True

    def sequence(self, prompt: list[int], settings: Settings, on_piece: Callable[[Piece], None]) -> Sequence:
        """A sequence ready for `Decoding.add`, its new tokens bounded by the model's positions."""
        wanted = settings.new_tokens(len(prompt), self.decoder_only)
        room = self.max_positions - (len(prompt) if self.decoder_only else 1)
        context = prompt if self.decoder_only else [self.start_id or 0]
        rng = np.random.default_rng(settings.seed) if settings.do_sample else None
        stream = StreamDecoder(self.detokenizer, context)
        return Sequence(prompt, settings, max(min(wanted, room), 0), stream, on_piece, rng)


def load_generator(
    directory: str | Path,
    options: SessionOptions | None = None,
    verify_hashes: bool = True,
    chat_template: Path | None = None,
    sessions: bool = True,
) -> Generator:
    """A generation package, ready to decode; `chat_template` serves when the package carries none.
    Without `sessions`: tokenizer, settings and chat template only, as a front-end process of
    `kiln serve --frontends N` needs them (the engine process decodes)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    verify_files(directory, manifest, check_hashes=verify_hashes)
    layout = manifest.generation
    if not layout:
        raise PackageError(f"{directory}: kiln.json has no generation layout; is this a {manifest.task} package?")
    options = options or SessionOptions()
    if sessions and resolve_provider(options.provider) == PROVIDERS["cpu"]:
        check_int8_cpus(directory, manifest.quantization)  # kiln's int8 decodes on the CPUs it was exported for
    runs = {}
    for role, name in layout["sessions"].items():
        path = inside(directory, name)
        if not path.is_file():
            raise PackageError(f"{directory}: missing {name} (the {role} session)")
        if sessions:
            runs[role] = create_session(path, options)
    tokenizer = Tokenizer.from_file(str(inside(directory, "tokenizer.json")))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    config = read_json(directory / "config.json")
    tokenizer_config = read_json(directory / "tokenizer_config.json")
    defaults = from_generation_config(directory, config, manifest.task)
    pad = defaults.pad_token_id if defaults.pad_token_id is not None else (defaults.eos_token_ids or (0,))[0]
    decoder = load_decoder(directory, layout, runs, pad, cache_device(options)) if sessions else None
    detokenizer = Detokenizer(tokenizer, bool(tokenizer_config.get("clean_up_tokenization_spaces", False)))
    positions = layout["max_positions"]
    defaults = replace(defaults, pad_token_id=pad)
    source = layout.get("max_source") or positions
    prefix = prompt_prefix(config, manifest.task)
    generation_config = directory / "generation_config.json"
    bos = (read_json(generation_config) if generation_config.is_file() else config).get("bos_token_id")
    template = load_chat_template(directory, chat_template)
    return Generator(
        directory, manifest, tokenizer, detokenizer, decoder, defaults, positions, source, runs, prefix, bos,
        template,
    )  # fmt: skip
