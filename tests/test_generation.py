"""Generation in the lean runtime, against the `transformers` pipelines on the original models.

Tiny models trained here (tests/tiny_generators.py), so greedy outputs mean something: GPT-2
continues news titles, BART summarises a story as its lead words, T5 translates English words into
Korean, and a Qwen2 (the Llama family's layout) answers a chat. fp32 packages, so greedy and beam
answers must be token-identical.
"""

from __future__ import annotations

import json

import pytest
from kiln.runtime import pipeline
from kiln.runtime.errors import InputTooLong, InvalidInput
from tiny_generators import DICTIONARY, NEWS, SUMMARY_WORDS

# the first words of titles GPT-2 learned to continue, and one it never saw
PROMPTS = ["Stocks rally as", "서울 지하철 요금이", "Heavy rain floods", "Seoul stocks"]
STORIES = [f"{NEWS[0]} {NEWS[5]}", f"{NEWS[12]} {NEWS[3]}"]
HF_TASK = {"gpt2": "text-generation", "bart": "summarization", "t5": "translation", "qwen2": "text-generation"}


@pytest.fixture(scope="module")
def hf(generator_model):
    from transformers import pipeline as hf_pipeline

    def make(kind: str):
        return hf_pipeline(HF_TASK[kind], model=str(generator_model(kind)), device="cpu")

    return make


def inputs_for(kind: str) -> list[str]:
    if kind in ("gpt2", "qwen2"):
        return PROMPTS
    if kind == "t5":
        return ["bank stocks", "the market rose", "Seoul bank"]
    return [
        "Seoul stocks rose on Monday as chip makers gained. The central bank held rates.",
        "한국은행이 기준금리를 동결했다. 시장은 안정됐다.",
    ]


@pytest.mark.parametrize("kind", ["gpt2", "bart", "t5", "qwen2"])
@pytest.mark.parametrize(
    "params",
    [
        {"max_new_tokens": 16, "do_sample": False},
        {"max_new_tokens": 12, "do_sample": False, "repetition_penalty": 1.3, "no_repeat_ngram_size": 2},
        {"max_new_tokens": 12, "num_beams": 3, "do_sample": False},
        {"max_new_tokens": 10, "num_beams": 2, "length_penalty": 2.0, "early_stopping": True, "do_sample": False},
    ],
    ids=["greedy", "penalties", "beam", "beam-early"],
)
def test_answers_are_the_transformers_pipelines(generator_package, hf, kind, params):
    ours = pipeline(generator_package(kind))
    theirs = hf(kind)
    for text in inputs_for(kind):
        assert ours(text, **params) == theirs(text, **params), text


@pytest.mark.parametrize("kind", ["bart", "t5"])
def test_seq2seq_defaults_are_the_pipelines_own(generator_package, hf, kind):
    """No parameters: the pipelines' defaults (4 beams, 256 new tokens) under the model's config."""
    text = inputs_for(kind)[0]
    assert pipeline(generator_package(kind))(text) == hf(kind)(text)


def test_trained_models_answer_sensibly(generator_package):
    """The tiny models learned their jobs, so the checks above compare meaningful text."""
    greedy = {"num_beams": 1, "do_sample": False}
    translated = pipeline(generator_package("t5"))("red apple", **greedy)[0]["translation_text"]
    assert translated == f"{DICTIONARY['red']} {DICTIONARY['apple']}"
    summary = pipeline(generator_package("bart"))(STORIES[0], **greedy)[0]["summary_text"]
    assert summary == " ".join(NEWS[0].split()[:SUMMARY_WORDS])
    continued = pipeline(generator_package("gpt2"))("Stocks rally as", max_new_tokens=30, **greedy)
    assert continued[0]["generated_text"] == NEWS[0]


def test_batched_prompts_answer_as_alone(generator_package):
    """Prompts of different lengths decoded side by side (left-padded, masked) answer as alone."""
    pipe = pipeline(generator_package("gpt2"))
    greedy = {"max_new_tokens": 16, "do_sample": False}
    together = pipe(PROMPTS, **greedy)
    assert together == [pipe(text, **greedy) for text in PROMPTS]


def test_stream_pieces_add_up_and_never_split_a_character(generator_package):
    pipe = pipeline(generator_package("gpt2"))
    for prompt in PROMPTS:
        pieces = list(pipe.stream(prompt, max_new_tokens=24, do_sample=False))
        whole = pipe(prompt, max_new_tokens=24, do_sample=False, return_full_text=False)[0]["generated_text"]
        assert "".join(p.text for p in pieces) == whole
        assert all("\ufffd" not in p.text for p in pieces)
        assert pieces[-1].finish_reason in ("stop", "length") and all(p.finish_reason is None for p in pieces[:-1])
        assert sum(p.tokens for p in pieces) <= 24


def test_korean_streams_whole_characters_only(generator_package):
    """Byte-level BPE splits a Hangul syllable over several tokens: some steps emit nothing."""
    pipe = pipeline(generator_package("gpt2"))
    pieces = list(pipe.stream("한국은행이", max_new_tokens=20, do_sample=False))
    assert any(p.text == "" for p in pieces), "expected steps that held back part of a character"
    assert any(ord(ch) > 0x3000 for p in pieces for ch in p.text)


def test_sampling_is_reproducible_with_a_seed(generator_package):
    pipe = pipeline(generator_package("gpt2"))
    sampled = {"max_new_tokens": 16, "do_sample": True, "temperature": 3.0, "top_k": 0, "top_p": 0.95}
    first = pipe("Seoul stocks", seed=7, **sampled)
    assert first == pipe("Seoul stocks", seed=7, **sampled)
    others = {pipe("Seoul stocks", seed=seed, **sampled)[0]["generated_text"] for seed in range(8)}
    assert len(others) > 1  # sampling samples


def test_temperature_zero_is_greedy_as_openai_and_vllm_mean_it(generator_package):
    pipe = pipeline(generator_package("gpt2"))
    assert pipe(PROMPTS[0], temperature=0, max_new_tokens=12) == pipe(PROMPTS[0], do_sample=False, max_new_tokens=12)


def test_stop_strings_end_the_answer_before_them(generator_package):
    pipe = pipeline(generator_package("gpt2"))
    full = pipe(PROMPTS[0], max_new_tokens=24, do_sample=False, return_full_text=False)[0]["generated_text"]
    stop = full.strip().split()[1] if len(full.split()) > 1 else full[2:4]
    cut = pipe(PROMPTS[0], max_new_tokens=24, do_sample=False, return_full_text=False, stop=[stop])
    assert cut[0]["generated_text"] == full[: full.index(stop)]
    streamed = "".join(p.text for p in pipe.stream(PROMPTS[0], max_new_tokens=24, do_sample=False, stop=[stop]))
    assert streamed == full[: full.index(stop)]


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"temperature": -0.5}, "'temperature'"),
        ({"top_p": 1.5}, "'top_p'"),
        ({"max_new_tokens": 0}, "'max_new_tokens'"),
        ({"num_beams": 2, "do_sample": True}, "'num_beams'"),
        ({"max_new_tokens": "ten"}, "'max_new_tokens'"),
        ({"beams": 2}, "'beams'"),
    ],
)
def test_bad_parameters_name_themselves(generator_package, params, needle):
    with pytest.raises(InvalidInput, match=needle):
        pipeline(generator_package("gpt2"))(PROMPTS[0], **params)


def test_over_long_prompt_is_refused_or_cut_with_a_flag(generator_package):
    pipe = pipeline(generator_package("gpt2"))
    long_prompt = "Seoul stocks rose " * 100
    with pytest.raises(InputTooLong, match="truncate=true"):
        pipe(long_prompt, max_new_tokens=4)
    (answer,) = pipe.generate([long_prompt], {"max_new_tokens": 4, "do_sample": False, "truncate": True})
    assert answer.truncated and answer.prompt_tokens == pipe.generator.max_positions - 1


def test_an_empty_prompt_is_answered_as_transformers_answers_it(generator_package, hf):
    """transformers gives `generate` no input ids for "", which then starts from the bos token."""
    for params in (
        {"max_new_tokens": 8, "do_sample": False},
        {"max_new_tokens": 6, "num_beams": 2, "do_sample": False},
    ):
        assert pipeline(generator_package("gpt2"))("", **params) == hf("gpt2")("", **params)


@pytest.mark.parametrize("kind", ["gpt2", "bart"])
def test_rows_that_finish_first_leave_the_rest_untouched(generator_package, kind):
    """Rows leaving from the middle of a running batch (their slots filled by the last rows, the
    cache cut to size in place) leave every other row's tokens as they are alone."""
    from kiln.runtime.generation.decoding import Decoding

    generator = pipeline(generator_package(kind)).generator
    prompts = [generator.tokenize(text, False, True)[0] for text in inputs_for(kind)[:2] * 3]
    lengths = [9, 2, 6, 1, 4, 7]  # rows 1, 3, 4 and 2 finish before the last rows

    def decode(rows: list[int]) -> list[list[int]]:
        decoding = Decoding(generator.decoder, generator.start_id)
        sequences = []
        for row in rows:
            wanted = {"max_new_tokens": lengths[row], "min_new_tokens": lengths[row], "do_sample": False}
            settings = generator.settings(wanted)
            sequences.append(generator.sequence(prompts[row], settings, lambda piece: None))
        decoding.add(sequences)
        while decoding.active:
            decoding.step()
        return [sequence.generated for sequence in sequences]

    together = decode(list(range(len(prompts))))
    assert [len(ids) for ids in together] == lengths
    assert together == [decode([row])[0] for row in range(len(prompts))]


@pytest.mark.parametrize("kind", ["gpt2", "t5"])
def test_int8_answers_do_not_depend_on_batch_mates(generator_package, kind):
    """kiln's int8 gives each row its own scale: a prompt's scores are the same bits alone and beside
    another of its length (onnxruntime's dynamic int8 shared one scale across a step's rows), and it
    decodes to the same tokens beside any others."""
    import numpy as np

    package = generator_package(kind, "int8")
    assert json.loads((package / "kiln.json").read_text())["quantization"]["int8_matmuls"] > 0
    pipe = pipeline(package)
    decoder = pipe.generator.decoder
    prompt = pipe.generator.tokenize(inputs_for(kind)[0], False, True)[0]
    mate = prompt[::-1]  # as long, so no padding differs between the two calls
    alone, cache = decoder.prefill([prompt])
    together, both = decoder.prefill([prompt, mate])
    assert np.array_equal(alone[0], together[0])
    token = np.array([int(alone[0].argmax())])
    step_alone, _ = decoder.step(cache, token)
    step_together, _ = decoder.step(both, np.array([token[0], int(together[1].argmax())]))
    assert np.array_equal(step_alone[0], step_together[0])

    greedy = {"max_new_tokens": 12, "do_sample": False}
    prompts = inputs_for(kind)
    answers = [pipe(text, **greedy) for text in prompts]
    assert pipe([*prompts[::-1], prompts[0]], **greedy) == [*answers[::-1], answers[0]]
