"""A served generator in process (`GenerativeModel`, as the data plane drives it): a request owns its
work, so whatever it opened is cancelled and its KV cache share given back on every way out, a
failing step reaches its caller as an error naming the request, and beam search runs on the model's
own thread, inside the KV budget, stopping for deadlines and cancellation."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from kiln.runtime.errors import Cancelled, DeadlineExceeded, InputTooLong, InternalError, QueueFull
from kiln.runtime.generation import decoding as decoding_module
from kiln.runtime.serve.batcher import BatchOptions, RequestState
from kiln.runtime.serve.generative import GenerativeModel
from kiln.runtime.serve.metrics import Metrics
from kiln.runtime.session import SessionOptions

GREEDY = {"max_new_tokens": 8, "do_sample": False}


@pytest.fixture(scope="module")
def model(generator_package):
    served = GenerativeModel(
        "gpt", generator_package("gpt2"), SessionOptions(), BatchOptions(max_cache_tokens=4096), Metrics()
    )
    yield served
    served.stop()


def params(model: GenerativeModel, **given) -> dict:
    return model.spec.parse_params(given)


def answer(model: GenerativeModel, texts: list[str], state: RequestState | None = None, **given):
    return asyncio.run(model.answer(texts, params(model, **given), state or RequestState()))


def wait_until_free(model: GenerativeModel) -> None:
    deadline = time.monotonic() + 10
    while model.scheduler.reserved or model.scheduler.decoding.active:
        assert time.monotonic() < deadline, f"{model.scheduler.reserved} KV cache tokens still reserved"
        time.sleep(0.01)


def test_a_refused_multi_prompt_request_leaves_the_cache_as_it_found_it(model):
    with pytest.raises(InputTooLong):
        answer(model, ["Seoul stocks"] * 20 + ["word " * 400], max_new_tokens=60)
    assert model.scheduler.reserved == 0 and model.scheduler.decoding.active == 0
    assert answer(model, ["Seoul stocks"], **GREEDY)[0].finish_reason in ("stop", "length")


def test_a_failing_prompt_cancels_its_request_mates(model, monkeypatch):
    choose = decoding_module.choose

    def faulty(sequence, logits, start_id):
        if sequence.prompt == model.generator.tokenize("Heavy rain floods", False)[0]:
            raise FloatingPointError("injected: probabilities contain NaN")
        return choose(sequence, logits, start_id)

    monkeypatch.setattr(decoding_module, "choose", faulty)
    with pytest.raises(InternalError) as error:
        answer(model, ["Seoul stocks", "Heavy rain floods", "Stocks rally as"], max_new_tokens=100, min_new_tokens=100)
    message = str(error.value)
    assert "(request " in message and "FloatingPointError: injected" in message and "server log" in message
    wait_until_free(model)  # the two healthy prompts were cancelled, not left generating
    monkeypatch.undo()
    assert answer(model, ["Heavy rain floods"], **GREEDY)[0].finish_reason in ("stop", "length")


def test_a_caller_that_leaves_frees_its_rows(model):
    async def leave_early() -> None:
        task = asyncio.ensure_future(
            model.answer(["Seoul stocks"] * 4, params(model, max_new_tokens=100, min_new_tokens=100), RequestState())
        )
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(leave_early())
    wait_until_free(model)


def test_beam_search_runs_on_its_own_thread_inside_the_budget(model, monkeypatch):
    threads = []
    beam = model.pipeline.beam

    def watched(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return beam(*args, **kwargs)

    monkeypatch.setattr(model.pipeline, "beam", watched)
    [result] = answer(model, ["Seoul stocks"], max_new_tokens=8, num_beams=4)
    assert threads == ["kiln-beam-gpt_0"] and result.tokens > 0
    wait_until_free(model)
    with pytest.raises(QueueFull, match="KV cache"):  # 200 prompts x 16 beams x 100 tokens: refused at once
        answer(model, ["Seoul stocks"] * 200, max_new_tokens=100, num_beams=16)
    assert model.scheduler.reserved == 0


def test_beam_search_stops_at_the_deadline_and_gives_its_share_back(model):
    state = RequestState(deadline=time.monotonic() + 0.05)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        answer(model, ["Seoul stocks"] * 4, state, max_new_tokens=100, min_new_tokens=100, num_beams=8)
    assert time.monotonic() - started < 1
    wait_until_free(model)  # queued searches never ran, the running one stopped at its next step


def test_beam_search_stops_when_cancelled(model):
    state = RequestState()
    state.cancelled = True
    with pytest.raises(Cancelled):
        answer(model, ["Seoul stocks"], state, max_new_tokens=50, num_beams=4)
    wait_until_free(model)
