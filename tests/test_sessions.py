"""The decoder's KV cache kept where the session made it (IO binding; on a GPU, device memory):
with device "cpu" the same path runs here, and must answer token for token as the plain path does,
through batching, rows leaving, rows joining a running batch and beam reordering."""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
import pytest
from kiln.runtime import SessionOptions
from kiln.runtime.generation.decoding import Decoding
from kiln.runtime.generation.package import load_generator
from kiln.runtime.serve.scheduler import Scheduler
from kiln.runtime.session import cache_device
from kiln.runtime.tasks import spec_for
from test_generation import inputs_for
from test_scheduler import Caller


def _pipeline(generator):
    return spec_for(generator.manifest.task).pipeline(generator, batch_size=8)


@pytest.mark.parametrize("kind", ["gpt2", "bart", "t5", "qwen2"])
def test_the_bound_cache_answers_as_the_plain_one(generator_package, kind):
    package = generator_package(kind)
    plain, bound = load_generator(package), load_generator(package, SessionOptions(kv_on_device=True))
    for params in (
        {"max_new_tokens": 12, "do_sample": False},
        {"max_new_tokens": 8, "num_beams": 3, "do_sample": False},
    ):
        texts = inputs_for(kind)
        assert _pipeline(bound)(texts, **params) == _pipeline(plain)(texts, **params), params


def test_steady_steps_keep_the_cache_out_of_numpy(generator_package):
    generator = load_generator(generator_package("gpt2"), SessionOptions(kv_on_device=True))
    decoder = generator.decoder
    prompts = [generator.tokenize(text, False)[0] for text in ("Stocks rally as", "Heavy rain floods")]
    logits, cache = decoder.prefill(prompts)
    _, cache = decoder.step(cache, logits.argmax(axis=1))
    assert all(isinstance(v, ort.OrtValue) for v in cache.past.values())
    assert isinstance(logits, np.ndarray)  # the logits come back for sampling
    rows = cache.select([1])  # a row leaving takes the cache to the host for that step
    assert all(isinstance(v, np.ndarray) for v in rows.past.values())


def test_rows_joining_a_running_batch_answer_as_alone(generator_package):
    package = generator_package("gpt2")
    plain, bound = load_generator(package), load_generator(package, SessionOptions(kv_on_device=True))
    prompts = ["Stocks rally as", "서울 지하철 요금이", "Heavy rain floods", "Seoul stocks"]
    expected = []
    for prompt in prompts:
        scheduler = Scheduler(Decoding(plain.decoder, plain.start_id), 8, 4096)
        scheduler.start()
        caller = Caller(plain, prompt, "alone", tokens=16)
        scheduler.submit([caller.sequence])
        expected.append(caller.result()[0])
        scheduler.stop()
    scheduler = Scheduler(Decoding(bound.decoder, bound.start_id), 8, 4096)
    scheduler.start()
    try:
        callers = []
        for index, prompt in enumerate(prompts):  # each arrives while the earlier ones are decoding
            callers.append(Caller(bound, prompt, f"r{index}", tokens=16))
            scheduler.submit([callers[-1].sequence])
            time.sleep(0.02)
        assert [c.result()[0] for c in callers] == expected
    finally:
        scheduler.stop()


def test_where_the_cache_lives():
    assert cache_device(SessionOptions()) is None  # CPU: in host memory anyway
    assert cache_device(SessionOptions(kv_on_device=True)) == "cpu"
