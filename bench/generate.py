"""`kiln bench generate`: text generation engines side by side on CPU, greedy, N new tokens each.

A generation figure means little alone, so every engine here gets the same corpus prompts in corpus
order and produces exactly N new tokens (eos is held off with min_new_tokens / min_length: on a
random-weight model an engine must not win by stopping early), and the engines take turns for
ROUNDS rounds (`kiln.bench.model._time_rounds`) so this machine's drift spreads over all of them.
Per engine: time to first token (TTFT) and inter-token latency (ITL) from each token's arrival,
tokens/s for one stream, aggregate tokens/s for S concurrent streams (one batched call of S prompts
for the in-process engines), and beside every speed the share of prompts whose greedy token ids are
identical to transformers' on those same prompts.

Servers are engines too: a kiln server through tritonclient streaming (`--url HOST:PORT`, gRPC) and
any OpenAI-compatible server (kiln, vLLM, TGI) through the `openai` SDK (`--openai-url
http://HOST:PORT/v1`), taking turns with the rest; `--open-loop-rates` then sends each server Poisson
arrivals at those rates (TTFT, ITL and end-to-end latency from each arrival, as vLLM's serving
benchmark and genai-perf report them).

    python -m kiln.bench.generate gpt2 build/gpt2-random --corpus ../shared/data/sentences.txt
    kiln bench generate --model build/gpt2-random --corpus ../shared/data/sentences.txt \
        --prompts 32 --new-tokens 64 --streams 1,8,32 --out bench/results/generate-gpt2
    kiln bench generate --model build/gpt2-random --package build/gpt2-int8 --engines transformers \
        --url localhost:8001 --openai-url http://localhost:8000/v1 --served-model gpt2-int8 \
        --streams 1,8 --open-loop-rates 1,4 --corpus ../shared/data/sentences.txt
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import queue
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kiln.bench import report
from kiln.bench.model import _Measured, _time_rounds
from kiln.bench.stats import ROUNDS, Timing, read_corpus

REFERENCE = "transformers"
DEFAULT_ENGINES = ("transformers", "optimum", "ctranslate2-fp32", "ctranslate2-int8")
SERVER = "kiln-server"
OPENAI_SERVER = "openai-server"


class Unavailable(Exception):
    """An engine this run cannot measure (not installed, not written yet, no server): reported, not fatal."""


@dataclass
class Generation:
    """One prompt's new tokens: ids where the engine exposes them, else the text; `arrivals` are seconds
    from the call's start to each token's arrival (a piece covering k tokens gives its time k times)."""

    ids: list[int] | None
    text: str | None = None
    arrivals: list[float] = field(default_factory=list)
    tokens: int | None = None  # the count, where an engine gives neither ids nor arrivals (a batch)

    def length(self) -> int:
        if self.ids is not None:
            return len(self.ids)
        return self.tokens if self.tokens is not None else len(self.arrivals)


class Engine(Protocol):
    """One way of generating: a single stream with timestamps; a batch of prompts if `batched`."""

    name: str
    batched: bool

    def stream(self, prompt: str) -> Generation: ...

    def batch(self, prompts: list[str]) -> list[Generation]: ...


@dataclass
class Options:
    """What one `kiln bench generate` run measures."""

    model: Path
    engines: list[str] = field(default_factory=lambda: list(DEFAULT_ENGINES))
    packages: list[Path] = field(default_factory=list)
    new_tokens: int = 64
    prompts: int = 32
    streams: list[int] = field(default_factory=lambda: [1, 8, 32])
    url: str | None = None  # a kiln server's gRPC HOST:PORT, driven by tritonclient streaming
    openai_url: str | None = None  # an OpenAI-compatible server's base URL (http://HOST:PORT/v1)
    served_model: str | None = None
    rates: list[float] = field(default_factory=list)  # open-loop requests/s for the servers
    rate_seconds: float = 20.0
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    cache: Path = Path("bench/results/cache")
    provider: str = "cpu"  # cuda: kiln on onnxruntime's CUDA EP, transformers in fp16 on the GPU, CTranslate2 on CUDA


# --- random models --------------------------------------------------------------------------------


def random_model(kind: str, directory: Path, corpus: Path | None = None, seed: int = 0) -> Path:
    """A random-weight model of a real shape, written offline (no hub): `gpt2` is GPT-2 small
    (768 wide, 12 layers, 12 heads, vocab 50257), `bart` is BART base (768 wide, 6+6 layers, vocab
    50265). Speed only: its logits are near ties, so agreement between engines is a lower bound.

    The tokenizer is a byte-level BPE trained on `corpus` (default: kiln export's validation texts).
    A small corpus runs out of merges long before 50k (our 38 KB corpus gives about 4.6k), so the
    vocabulary is padded with unreachable `<|unused_N|>` entries up to the model's size: the LM head
    keeps GPT-2's cost, and every id any engine may pick decodes to text."""
    import torch
    from transformers import BartConfig, BartForConditionalGeneration, GPT2Config, GPT2LMHeadModel

    directory = Path(directory)
    texts = read_corpus(corpus or _validation_texts())
    torch.manual_seed(seed)
    if kind == "gpt2":
        tokenizer = _bpe_tokenizer(texts, 50257, specials=[], last="<|endoftext|>")
        eos = 50256
        config = GPT2Config(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, bos_token_id=eos, eos_token_id=eos)
        model: Any = GPT2LMHeadModel(config)
        names = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    elif kind == "bart":
        tokenizer = _bpe_tokenizer(texts, 50265, specials=["<s>", "<pad>", "</s>", "<unk>"], last="<mask>")
        config = BartConfig(
            vocab_size=50265,
            d_model=768,
            encoder_layers=6,
            decoder_layers=6,
            encoder_attention_heads=12,
            decoder_attention_heads=12,
            encoder_ffn_dim=3072,
            decoder_ffn_dim=3072,
            bos_token_id=0,
            pad_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=2,
            forced_bos_token_id=None,
            forced_eos_token_id=None,  # BartConfig forces eos at max_length by default
            normalize_before=False,  # as in facebook/bart-base's config; ctranslate2's converter reads it
        )
        model = BartForConditionalGeneration(config)
        names = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
        names["mask_token"] = "<mask>"
    else:
        raise SystemExit(f"random_model: kind is gpt2 or bart, not {kind!r}")
    model.eval().save_pretrained(directory)
    _save_tokenizer(tokenizer, names, directory)
    return directory


def _validation_texts() -> Path:
    from importlib.resources import files

    return Path(str(files("kiln.export") / "data" / "validation.txt"))


def _bpe_tokenizer(texts: list[str], size: int, specials: list[str], last: str) -> Any:
    """Byte-level BPE: `specials` first, trained merges, unused fillers, then `last` at id size-1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=size - 1, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer)
    data = json.loads(tokenizer.to_str())
    vocab = data["model"]["vocab"]
    for n in itertools.count():
        if len(vocab) >= size - 1:
            break
        vocab[f"<|unused_{n}|>"] = len(vocab)
    tokenizer = Tokenizer.from_str(json.dumps(data))
    tokenizer.add_special_tokens([last])
    if "<s>" in specials:  # BART wraps its input as <s> ... </s>
        tokenizer.post_processor = processors.RobertaProcessing(sep=("</s>", 2), cls=("<s>", 0))
    return tokenizer


def _save_tokenizer(tokenizer: Any, names: dict[str, str], directory: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, model_max_length=1024, model_input_names=["input_ids", "attention_mask"], **names
    )
    fast.save_pretrained(directory)


# --- engines ----------------------------------------------------------------------------------------


def _is_seq2seq(model: Path) -> bool:
    config = json.loads((Path(model) / "config.json").read_text())
    return bool(config.get("is_encoder_decoder"))


def _tokenizer(model: Path, seq2seq: bool) -> Any:
    """The model's tokenizer, padding on the left for batched decoder-only generation."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.model_input_names = ["input_ids", "attention_mask"]  # GPT-2 would add token_type_ids to its inputs
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right" if seq2seq else "left"
    return tokenizer


def greedy_config(base: Any, new_tokens: int) -> Any:
    """Plain greedy for exactly `new_tokens`, keeping only the model's special ids: no repetition
    penalty, forced token or n-gram rule from the model's defaults that another engine would lack."""
    from transformers import GenerationConfig

    eos = base.eos_token_id[0] if isinstance(base.eos_token_id, list) else base.eos_token_id
    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        bos_token_id=base.bos_token_id,
        eos_token_id=eos,
        pad_token_id=base.pad_token_id if base.pad_token_id is not None else eos,
        decoder_start_token_id=base.decoder_start_token_id,
    )


class _Arrivals:
    """A generate() streamer that only notes when each new token leaves the loop; its first put()
    is the prompt (or the decoder start token), not a new token."""

    def __init__(self, start: float):
        self.start, self.arrivals, self._prompt_seen = start, [], False

    def put(self, value: Any) -> None:
        if self._prompt_seen:
            self.arrivals.append(time.perf_counter() - self.start)
        self._prompt_seen = True

    def end(self) -> None:
        pass


class HFEngine:
    """transformers' generate() loop on a PyTorch model or an optimum ORTModel: same loop, other kernels."""

    batched = True

    def __init__(self, name: str, model: Any, tokenizer: Any, seq2seq: bool, new_tokens: int):
        self.name, self.model, self.tokenizer, self.seq2seq = name, model, tokenizer, seq2seq
        model.generation_config = greedy_config(model.generation_config, new_tokens)

    def stream(self, prompt: str) -> Generation:
        start = time.perf_counter()
        streamer = _Arrivals(start)
        inputs = self.tokenizer(prompt, return_tensors="pt").to(self.model.device)
        out = self.model.generate(**inputs, streamer=streamer)
        return Generation(self._new_ids(out, inputs)[0], arrivals=streamer.arrivals)

    def batch(self, prompts: list[str]) -> list[Generation]:
        inputs = self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.model.device)
        out = self.model.generate(**inputs)
        return [Generation(ids) for ids in self._new_ids(out, inputs)]

    def _new_ids(self, out: Any, inputs: Any) -> list[list[int]]:
        skip = 1 if self.seq2seq else inputs["input_ids"].shape[1]  # decoder start, or the prompt
        return out[:, skip:].tolist()


def transformers_engine(options: Options) -> HFEngine:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    torch.set_num_threads(options.threads)
    seq2seq = _is_seq2seq(options.model)
    cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    model = cls.from_pretrained(options.model).eval()
    if options.provider == "cuda":  # the GPU reference: transformers' fp16 generate
        model = model.half().to("cuda")
    return HFEngine(REFERENCE, model, _tokenizer(options.model, seq2seq), seq2seq, options.new_tokens)


def optimum_engine(options: Options) -> HFEngine:
    """The model as an optimum user runs it: exported once by optimum (with its KV cache) into the cache."""
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForCausalLM, ORTModelForSeq2SeqLM

    seq2seq = _is_seq2seq(options.model)
    cls = ORTModelForSeq2SeqLM if seq2seq else ORTModelForCausalLM
    directory = _cache_dir(options) / "optimum"
    if not (directory / "config.json").is_file() or not any(directory.glob("*.onnx")):
        cls.from_pretrained(options.model, export=True).save_pretrained(directory)
    session = ort.SessionOptions()
    session.intra_op_num_threads = options.threads
    provider = "CUDAExecutionProvider" if options.provider == "cuda" else "CPUExecutionProvider"
    model = cls.from_pretrained(directory, session_options=session, provider=provider)
    return HFEngine("optimum", model, _tokenizer(options.model, seq2seq), seq2seq, options.new_tokens)


class CTranslate2Engine:
    """CTranslate2's Generator (decoder-only) or Translator (encoder-decoder); generate_tokens streams."""

    batched = True

    def __init__(self, name: str, directory: Path, options: Options, compute_type: str):
        import ctranslate2

        self.name, self.new_tokens = name, options.new_tokens
        self.seq2seq = _is_seq2seq(options.model)
        self.tokenizer = _tokenizer(options.model, self.seq2seq)
        cls = ctranslate2.Translator if self.seq2seq else ctranslate2.Generator
        device = "cuda" if options.provider == "cuda" else "cpu"
        if device == "cuda":  # its GPU forms: float16, and int8 weights with float16 compute
            compute_type = {"float32": "float16", "int8": "int8_float16"}[compute_type]
        self.model = cls(
            str(directory), device=device, compute_type=compute_type, inter_threads=1, intra_threads=options.threads
        )

    def _tokens(self, prompt: str) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(self.tokenizer(prompt)["input_ids"])

    def stream(self, prompt: str) -> Generation:
        start = time.perf_counter()
        ids, arrivals = [], []
        for step in self._steps(self._tokens(prompt)):
            arrivals.append(time.perf_counter() - start)
            ids.append(step.token_id)
        return Generation(ids, arrivals=arrivals)

    def _steps(self, tokens: list[str]) -> Iterator[Any]:
        n = self.new_tokens
        if self.seq2seq:
            return self.model.generate_tokens(tokens, max_decoding_length=n, min_decoding_length=n, sampling_topk=1)
        return self.model.generate_tokens(tokens, max_length=n, min_length=n, sampling_topk=1)

    def batch(self, prompts: list[str]) -> list[Generation]:
        tokens, n = [self._tokens(p) for p in prompts], self.new_tokens
        if self.seq2seq:
            results = self.model.translate_batch(tokens, beam_size=1, max_decoding_length=n, min_decoding_length=n)
            return [Generation(self.tokenizer.convert_tokens_to_ids(r.hypotheses[0])) for r in results]
        results = self.model.generate_batch(
            tokens, beam_size=1, max_length=n, min_length=n, include_prompt_in_result=False
        )
        return [Generation(r.sequences_ids[0]) for r in results]


def ctranslate2_engine(options: Options, precision: str) -> CTranslate2Engine:
    """Converted once per precision by ctranslate2's TransformersConverter, into the cache."""
    try:
        from ctranslate2.converters import TransformersConverter
    except ImportError as exc:
        raise Unavailable("ctranslate2 is not installed (pip install ctranslate2)") from exc
    quantization = {"fp32": "float32", "int8": "int8"}[precision]
    directory = _cache_dir(options) / f"ctranslate2-{precision}"
    if not (directory / "model.bin").is_file():
        try:
            TransformersConverter(str(options.model)).convert(str(directory), quantization=quantization, force=True)
        except Exception as exc:  # an architecture or config its converter does not take
            raise Unavailable(f"ctranslate2 cannot convert {options.model} ({type(exc).__name__}: {exc})") from exc
    return CTranslate2Engine(f"ctranslate2-{precision}", directory, options, quantization)


class KilnEngine:
    """A kiln package in process, through the generation API being written now:
    `pipeline(pkg).stream(prompt, max_new_tokens=N, min_new_tokens=N)` yields pieces with `.text` and
    `.tokens` (how many tokens the piece covers; 0 for a held-back partial UTF-8 piece). Only this
    class knows that API. Pieces carry no ids, so accuracy compares its text with transformers' ids
    decoded."""

    batched = True

    def __init__(self, package: Path, options: Options):
        from kiln.runtime import pipeline

        self.name, self.new_tokens = f"kiln:{package.name}", options.new_tokens
        try:
            self.pipe = pipeline(package, provider=options.provider, threads=options.threads, batch_size=64)
        except Exception as exc:  # the runtime for generation is in progress: say why, measure the rest
            raise Unavailable(f"the kiln runtime cannot load {package} yet ({type(exc).__name__}: {exc})") from exc
        if not callable(getattr(self.pipe, "stream", None)):
            raise Unavailable(f"{type(self.pipe).__name__} has no stream() yet (kiln's generation runtime)")

    def _greedy(self) -> dict[str, Any]:
        n = self.new_tokens
        return {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False, "num_beams": 1}

    def stream(self, prompt: str) -> Generation:
        start = time.perf_counter()
        pieces, arrivals = [], []
        for piece in self.pipe.stream(prompt, **self._greedy()):
            arrivals += [time.perf_counter() - start] * piece.tokens
            pieces.append(piece.text)
        return Generation(None, "".join(pieces), arrivals)

    def batch(self, prompts: list[str]) -> list[Generation]:
        """All prompts decoded side by side (kiln's continuous batching, in process)."""
        answers = self.pipe.generate(prompts, self._greedy())
        return [Generation(None, a.text, tokens=a.tokens) for a in answers]


class KilnServerEngine:
    """A running kiln server over gRPC ModelStreamInfer, in Triton's decoupled generate convention:
    inputs `text_input` BYTES, `max_tokens` INT32, `stream` BOOL, `sampling_parameters` BYTES (JSON);
    output `text_output`, one response per piece, then an empty final response. Each non-empty
    response counts as one token (the convention of Triton's generate backends). S concurrent
    streams are S clients, one request each. Not yet measured against a kiln server: the hook."""

    batched = True

    def __init__(self, url: str, model: str, options: Options):
        try:
            import tritonclient.grpc  # noqa: F401  (the dev extra has it)
        except ImportError as exc:
            raise Unavailable("tritonclient[grpc] is not installed") from exc
        self.name, self.url, self.model, self.new_tokens = SERVER, url, model, options.new_tokens

    def _inputs(self, prompt: str) -> list[Any]:
        import numpy as np
        import tritonclient.grpc as grpcclient

        n = self.new_tokens  # kiln reads temperature 0 as greedy and min_tokens as min_new_tokens, as vLLM does
        sampling = json.dumps({"temperature": 0.0, "min_tokens": n, "max_tokens": n})
        values = {
            "text_input": (np.array([prompt.encode()], dtype=object), "BYTES"),
            "max_tokens": (np.array([self.new_tokens], dtype=np.int32), "INT32"),
            "stream": (np.array([True]), "BOOL"),
            "sampling_parameters": (np.array([sampling.encode()], dtype=object), "BYTES"),
            "exclude_input_in_output": (np.array([True]), "BOOL"),  # the new text only, as the others give
        }
        inputs = []
        for name, (value, dtype) in values.items():
            tensor = grpcclient.InferInput(name, list(value.shape), dtype)
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        return inputs

    def stream(self, prompt: str) -> Generation:
        import tritonclient.grpc as grpcclient

        answers: queue.Queue[tuple[Any, Any, float]] = queue.Queue()
        client = grpcclient.InferenceServerClient(self.url)
        client.start_stream(callback=lambda result, error: answers.put((result, error, time.perf_counter())))
        pieces, arrivals = [], []
        try:
            start = time.perf_counter()
            client.async_stream_infer(self.model, self._inputs(prompt), enable_empty_final_response=True)
            while True:
                result, error, at = answers.get(timeout=120)
                if error is not None:
                    raise RuntimeError(f"{self.url} {self.model}: {error}")
                text = result.as_numpy("text_output")
                if text is not None and text.size:
                    pieces.append(b"".join(text.reshape(-1)).decode("utf-8", "replace"))
                    arrivals.append(at - start)
                parameters = result.get_response().parameters
                if parameters["triton_final_response"].bool_param:
                    break
        finally:
            client.stop_stream()
            client.close()
        # kiln's last response says how many tokens the pieces covered (a piece may hold back a
        # partial character and cover several); a server that does not say counts its responses
        counted = parameters["generated_tokens"].int64_param if "generated_tokens" in parameters else None
        return Generation(None, "".join(pieces), arrivals, tokens=counted)

    def batch(self, prompts: list[str]) -> list[Generation]:
        with ThreadPoolExecutor(len(prompts)) as pool:
            return list(pool.map(self.stream, prompts))


class OpenAIEngine:
    """Any OpenAI-compatible server (kiln, vLLM, TGI, ...) through the `openai` SDK, as its users reach it:
    streamed `/v1/completions`, temperature 0, exactly N new tokens (`min_tokens`, vLLM's extension,
    holds eos off; a server without it may stop early, which the `exactly N` column shows). Each
    streamed chunk's arrival is a token's (a chunk covering k tokens counts k times, by the usage the
    last chunk reports). S concurrent streams are S threads, one request each."""

    batched = True

    def __init__(self, base_url: str, model: str, options: Options):
        try:
            import openai
        except ImportError as exc:
            raise Unavailable("the openai package is not installed") from exc
        self.name, self.model, self.new_tokens = OPENAI_SERVER, model, options.new_tokens
        self.client = openai.OpenAI(
            base_url=base_url, api_key=os.environ.get("OPENAI_API_KEY", "unused"), max_retries=0
        )

    def stream(self, prompt: str) -> Generation:
        start = time.perf_counter()
        chunks = self.client.completions.create(
            model=self.model, prompt=prompt, max_tokens=self.new_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"min_tokens": self.new_tokens},
        )  # fmt: skip
        pieces, arrivals, counted = [], [], None
        for chunk in chunks:
            if chunk.usage is not None:
                counted = chunk.usage.completion_tokens
            for choice in chunk.choices:
                if choice.text:
                    pieces.append(choice.text)
                    arrivals.append(time.perf_counter() - start)
        return Generation(None, "".join(pieces), arrivals, tokens=counted)

    def batch(self, prompts: list[str]) -> list[Generation]:
        with ThreadPoolExecutor(len(prompts)) as pool:
            return list(pool.map(self.stream, prompts))


def open_loop(engine: Engine, prompts: list[str], rate: float, seconds: float, seed: int = 0) -> dict[str, Any]:
    """Requests arriving at `rate` a second (Poisson, as vLLM's serving benchmark sends them) for
    `seconds`, whatever the server's pace: TTFT, ITL and end-to-end latency from each request's
    arrival, output tokens/s and requests/s over the span from the first arrival to the last answer."""
    import random

    rng = random.Random(seed)
    arrivals, at = [], 0.0
    while at < seconds:
        arrivals.append(at)
        at += rng.expovariate(rate)
    start = time.perf_counter()

    def one(index: int) -> tuple[float, Generation]:
        delay = start + arrivals[index] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        sent = time.perf_counter()
        return sent - start, engine.stream(prompts[index % len(prompts)])

    with ThreadPoolExecutor(min(len(arrivals), 256)) as pool:
        done = list(pool.map(one, range(len(arrivals))))
    wall = time.perf_counter() - start
    tokens = sum(g.length() for _, g in done)
    ttft = [g.arrivals[0] for _, g in done if g.arrivals]
    itl = [b - a for _, g in done for a, b in itertools.pairwise(g.arrivals)]
    e2e = [g.arrivals[-1] for _, g in done if g.arrivals]
    row: dict[str, Any] = {"engine": engine.name, "rate": rate, "requests": len(done), "seconds": wall}
    row |= {"tokens_per_s": tokens / wall, "requests_per_s": len(done) / wall}
    for name, values in (("ttft", ttft), ("itl", itl), ("e2e", e2e)):
        timing = Timing.of(engine.name, name, values or [0.0], wall, 0, 0)
        row |= {f"{name}_p50_ms": timing.p50_ms, f"{name}_p90_ms": timing.p90_ms, f"{name}_p99_ms": timing.p99_ms}
    return row


def _cache_dir(options: Options) -> Path:
    """Exports and conversions of this model, keyed by its files' sizes and times so a changed model is
    exported again."""
    files = sorted(p for p in Path(options.model).iterdir() if p.is_file())
    key = hashlib.sha256(repr([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]).encode())
    return options.cache / f"{Path(options.model).resolve().name}-{key.hexdigest()[:10]}"


def build_engines(options: Options) -> tuple[dict[str, Engine], dict[str, str], dict[str, float]]:
    """The engines asked for, the reference first; those that cannot run are reported with the reason."""
    builders: dict[str, Callable[[], Engine]] = {
        "transformers": lambda: transformers_engine(options),
        "optimum": lambda: optimum_engine(options),
        "ctranslate2-fp32": lambda: ctranslate2_engine(options, "fp32"),
        "ctranslate2-int8": lambda: ctranslate2_engine(options, "int8"),
    }
    unknown = [name for name in options.engines if name not in builders]
    if unknown:
        raise SystemExit(f"unknown engine(s) {', '.join(unknown)}; known: {', '.join(builders)}")
    for package in options.packages:
        builders[f"kiln:{package.name}"] = lambda package=package: KilnEngine(package, options)
    model = options.served_model or Path(options.model).name
    if options.url:
        builders[SERVER] = lambda: KilnServerEngine(options.url or "", model, options)
    if options.openai_url:
        builders[OPENAI_SERVER] = lambda: OpenAIEngine(options.openai_url or "", model, options)
    servers = (n for n in builders if n.startswith("kiln") or n == OPENAI_SERVER)
    wanted = sorted([*options.engines, *servers], key=lambda n: n != REFERENCE)
    engines, skipped, load_s = {}, {}, {}
    if not options.url:
        skipped[SERVER] = "not yet available: pass --url HOST:PORT of a running kiln server (gRPC)"
    for name in wanted:
        start = time.perf_counter()
        try:
            engines[name] = builders[name]()
        except Unavailable as exc:
            skipped[name] = str(exc)
            continue
        load_s[name] = time.perf_counter() - start
    return engines, skipped, load_s


# --- measurement ------------------------------------------------------------------------------------


def _common_prefix(a: Any, b: Any) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def agreement(reference: list[Generation], got: list[Generation], decode: Callable[[list[int]], str]) -> dict:
    """Share of prompts with identical greedy ids (the text, for engines without ids), and the mean
    share of each output that matches before the first difference."""
    same, prefix = [], []
    for ref, gen in zip(reference, got, strict=True):
        expected, actual = (ref.ids, gen.ids) if gen.ids is not None else (decode(ref.ids or []), gen.text or "")
        same.append(expected == actual)
        prefix.append(_common_prefix(expected, actual) / max(len(expected), 1))
    return {"agreement": sum(same) / len(same), "prefix_match": sum(prefix) / len(prefix)}


def _outputs(m: _Measured, batches: int) -> list[Generation]:
    """The generations in prompt order (a single stream returns one, a batch a list)."""
    flat: list[Generation] = []
    for i in range(batches):
        out = m.outputs[i]
        flat += out if isinstance(out, list) else [out]
    return flat


def _row(name: str, streams: int, m: _Measured, gens: list[Generation], new_tokens: int) -> dict[str, Any]:
    """Speed of one engine at one stream count; TTFT and ITL where tokens arrived one by one."""
    tokens = sum(g.length() for g in gens)
    speed = Timing.of(name, f"{streams} streams", m.latencies, m.wall, len(gens), tokens)
    row: dict[str, Any] = {"engine": name, "streams": streams, "tokens_per_s": speed.tokens_per_s}
    row["call_p50_ms"], row["exact_length"] = speed.p50_ms, all(g.length() == new_tokens for g in gens)
    ttft = [g.arrivals[0] for g in gens if g.arrivals]
    itl = [b - a for g in gens for a, b in itertools.pairwise(g.arrivals)]
    if ttft:
        first, between = Timing.of(name, "ttft", ttft, m.wall, 0, 0), Timing.of(name, "itl", itl, m.wall, 0, 0)
        row |= {"ttft_p50_ms": first.p50_ms, "ttft_p90_ms": first.p90_ms}
        row |= {"itl_p50_ms": between.p50_ms, "itl_p99_ms": between.p99_ms}
    return row


def measure(
    engines: dict[str, Engine], batches: list[list[str]], streams: int, new_tokens: int, decode: Callable
) -> list[dict[str, Any]]:
    """All engines over the same batches in alternating rounds; accuracy against the reference."""
    if streams == 1:
        runs = {name: (lambda batch, e=e: e.stream(batch[0])) for name, e in engines.items()}
    else:
        runs = {name: e.batch for name, e in engines.items() if e.batched}
    measured = _time_rounds(runs, batches)
    outputs = {name: _outputs(m, len(batches)) for name, m in measured.items()}
    rows = []
    for name, m in measured.items():
        row = _row(name, streams, m, outputs[name], new_tokens)
        if REFERENCE in outputs and name != REFERENCE:
            row |= agreement(outputs[REFERENCE], outputs[name], decode)
        rows.append(row)
    return rows


def steps(options: Options) -> int:
    servers = bool(options.url) + bool(options.openai_url)
    return 1 + len(options.streams) + servers * len(options.rates)


def bench_generate(options: Options, texts: list[str], progress: Callable[[str], None]) -> dict[str, Any]:
    """Every engine at every stream count on corpus prompts in corpus order."""
    progress(f"generate: loading engines ({', '.join(options.engines)}; exports cached in {options.cache})")
    engines, skipped, load_s = build_engines(options)
    if not engines:
        raise SystemExit(f"no engine could run: {skipped}")
    tokenizer = _tokenizer(options.model, _is_seq2seq(options.model))
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)  # noqa: E731
    prompts = texts[: options.prompts]
    rows = []
    for streams in options.streams:
        chosen = texts[: max(options.prompts, streams)]
        batches = [chosen[i : i + streams] for i in range(0, len(chosen) - streams + 1, streams)]
        if not batches:
            raise SystemExit(f"{streams} streams need {streams} corpus prompts; the corpus has {len(texts)}")
        names = [n for n, e in engines.items() if streams == 1 or e.batched]
        progress(f"generate: {', '.join(names)} at {streams} stream(s), {len(batches)} calls in {ROUNDS} rounds")
        rows += measure(engines, batches, streams, options.new_tokens, decode)
    servers = {n: e for n, e in engines.items() if n in (SERVER, OPENAI_SERVER)}
    open_rows = []
    for rate in options.rates:  # the servers take turns at each rate
        for name, engine in servers.items():
            progress(f"generate: {name} open loop at {rate:g} requests/s for {options.rate_seconds:g} s")
            open_rows.append(open_loop(engine, texts, rate, options.rate_seconds))
    return {
        "open_loop": open_rows,
        "source": str(options.model),
        "architecture": "encoder-decoder" if _is_seq2seq(options.model) else "decoder-only",
        "new_tokens": options.new_tokens,
        "prompts": len(prompts),
        "prompt_tokens_mean": sum(len(tokenizer(p)["input_ids"]) for p in prompts) / len(prompts),
        "threads": options.threads,
        "rounds": ROUNDS,
        "load_s": load_s,
        "skipped": skipped,
        "rows": rows,
    }


# --- report -----------------------------------------------------------------------------------------


def _ms(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, float) else "–"


def markdown(data: dict[str, Any]) -> str:
    """The generate section: speed and, beside it, agreement with transformers on the same prompts."""
    lines = [
        f"## generate: {data['source']} ({data['architecture']}), greedy, {data['new_tokens']} new tokens, "
        f"{data['prompts']} corpus prompts (mean {data['prompt_tokens_mean']:.0f} tokens), "
        f"{data['threads']} threads, {data['rounds']} alternating rounds",
        "",
        "| engine | streams | tokens/s | TTFT p50 ms | TTFT p90 ms | ITL p50 ms | ITL p99 ms "
        "| same ids as transformers | matching prefix | exactly N |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in data["rows"]:
        same = "reference" if r["engine"] == REFERENCE else _share(r.get("agreement"))
        lines.append(
            f"| {r['engine']} | {r['streams']} | {r['tokens_per_s']:.1f} | {_ms(r.get('ttft_p50_ms'))} "
            f"| {_ms(r.get('ttft_p90_ms'))} | {_ms(r.get('itl_p50_ms'))} | {_ms(r.get('itl_p99_ms'))} "
            f"| {same} | {_share(r.get('prefix_match'))} | {'yes' if r['exact_length'] else 'NO'} |"
        )
    lines += [
        "",
        "- tokens/s: new tokens over the wall time of the calls (prefill included); at S streams one "
        "batched call of S prompts (in-process engines) or S concurrent requests (kiln-server, openai-server).",
        "- TTFT from the call (tokenization included) to the first new token; ITL between consecutive tokens.",
    ]
    if data.get("open_loop"):
        lines += [
            "",
            f"Open loop (Poisson arrivals; latency from each request's arrival; {data['new_tokens']} new tokens each):",
            "",
            "| engine | requests/s sent | requests | requests/s done | tokens/s | TTFT p50 / p90 / p99 ms "
            "| ITL p50 / p90 / p99 ms | end-to-end p50 / p90 / p99 ms |",
            "|---|---:|---:|---:|---:|---|---|---|",
        ]
        for r in data["open_loop"]:
            spans = [" / ".join(_ms(r[f"{k}_{q}_ms"]) for q in ("p50", "p90", "p99")) for k in ("ttft", "itl", "e2e")]
            lines.append(
                f"| {r['engine']} | {r['rate']:g} | {r['requests']} | {r['requests_per_s']:.2f} "
                f"| {r['tokens_per_s']:.1f} | {' | '.join(spans)} |"
            )
    lines += [f"- {name}: load {seconds:.1f} s" for name, seconds in data["load_s"].items()]
    lines += [f"- {name}: skipped, {reason}" for name, reason in data["skipped"].items()]
    return "\n".join(lines) + "\n"


def _share(value: Any) -> str:
    return f"{value:.2%}" if isinstance(value, float) else "–"


def plot(data: dict[str, Any], out: Path) -> Path:
    """Tokens/s by engine and stream count, and one-stream speed against agreement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    engines = list(dict.fromkeys(r["engine"] for r in rows))
    levels = sorted({r["streams"] for r in rows})
    width = 0.8 / len(engines)
    fig, (bars, cost) = plt.subplots(1, 2, figsize=(11, 4))
    for k, engine in enumerate(engines):
        mine = [r for r in rows if r["engine"] == engine]
        xs = [levels.index(r["streams"]) + (k - (len(engines) - 1) / 2) * width for r in mine]
        bars.bar(xs, [r["tokens_per_s"] for r in mine], width, label=engine)
    bars.set_xticks(range(len(levels)), [f"{s} stream{'s' if s > 1 else ''}" for s in levels])
    bars.set(ylabel="new tokens/s", title=f"greedy, {data['new_tokens']} new tokens")
    bars.legend(fontsize=7)
    for r in rows:
        if r["streams"] == 1:
            score = 1.0 if r["engine"] == REFERENCE else r.get("agreement")
            if score is not None:
                cost.scatter(r["tokens_per_s"], score)
                cost.annotate(r["engine"], (r["tokens_per_s"], score), fontsize=7)
    cost.set(xlabel="tokens/s, one stream", ylabel="same greedy ids as transformers", title="speed against accuracy")
    return report._save(fig, out / "generate.png")


def render(results: dict[str, Any]) -> str:
    return report.markdown(results) + markdown(results["generate"])


def write(results: dict[str, Any], out: Path) -> list[Path]:
    """report.write for results.json, then results.md and the plot with the generate section, which
    report.markdown and report.plots do not render."""
    paths = report.write(results, out)
    (out / "results.md").write_text(render(results))
    return [*paths, plot(results["generate"], out)]


def main() -> None:
    """Build a random-weight model: python -m kiln.bench.generate gpt2|bart OUT [--corpus FILE]."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("kind", choices=["gpt2", "bart"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--corpus", type=Path, help="texts to train the tokenizer on (default: kiln's own)")
    args = parser.parse_args()
    print(random_model(args.kind, args.out, args.corpus))


if __name__ == "__main__":
    main()
