"""The decoding thread under faults, with the tiny trained GPT-2: a failure ends only the sequences
it touched (each learns why), the next request is served, and a thread that dies anyway fails what
it held at once, reports itself not alive and comes back."""

from __future__ import annotations

import threading
import time

import pytest
from kiln.runtime.generation import decoding as decoding_module
from kiln.runtime.generation.decoding import FINISH_ERROR, Decoding, Piece
from kiln.runtime.generation.package import load_generator
from kiln.runtime.serve.scheduler import Scheduler


@pytest.fixture(scope="module")
def generator(generator_package):
    return load_generator(generator_package("gpt2"))


class Caller:
    """What a served request holds: its sequence and the pieces handed to it."""

    def __init__(self, generator, prompt: str, request_id: str, tokens: int = 12, watch: Scheduler | None = None):
        settings = generator.settings({"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False})
        ids, _ = generator.tokenize(prompt, False)
        self.pieces: list[Piece] = []
        self.alive_at_end: bool | None = None
        self.done = threading.Event()
        self.watch = watch
        self.sequence = generator.sequence(ids, settings, self._take)
        self.sequence.request_id = request_id

    def _take(self, piece: Piece) -> None:
        self.pieces.append(piece)
        if piece.finish_reason is not None:
            self.alive_at_end = self.watch.alive if self.watch else None
            self.done.set()

    def result(self, timeout: float = 10) -> tuple[str, str]:
        assert self.done.wait(timeout), f"request {self.sequence.request_id} was never answered"
        return "".join(p.text for p in self.pieces), self.pieces[-1].finish_reason


@pytest.fixture
def scheduler(generator):
    running = Scheduler(Decoding(generator.decoder, generator.start_id), 8, 4096, name="gpt")
    running.start()
    yield running
    running.stop()


def alone(generator, prompt: str) -> str:
    scheduler = Scheduler(Decoding(generator.decoder, generator.start_id), 8, 4096)
    scheduler.start()
    caller = Caller(generator, prompt, "alone")
    scheduler.submit([caller.sequence])
    try:
        return caller.result()[0]
    finally:
        scheduler.stop()


def test_a_row_that_fails_ends_alone_and_the_rest_are_untouched(generator, scheduler, monkeypatch):
    expected = {prompt: alone(generator, prompt) for prompt in ("Seoul stocks", "Heavy rain floods")}
    choose = decoding_module.choose

    def faulty(sequence, logits, start_id):
        if sequence.request_id == "bad" and len(sequence.generated) == 3:
            raise RuntimeError("injected fault in one row")
        return choose(sequence, logits, start_id)

    monkeypatch.setattr(decoding_module, "choose", faulty)
    callers = [
        Caller(generator, "Seoul stocks", "good-1"),
        Caller(generator, "Stocks rally as", "bad"),
        Caller(generator, "Heavy rain floods", "good-2"),
    ]
    scheduler.submit([c.sequence for c in callers])
    assert callers[1].result()[1] == FINISH_ERROR
    assert "injected fault" in str(callers[1].sequence.error)
    assert callers[0].result() == (expected["Seoul stocks"], "length")
    assert callers[2].result() == (expected["Heavy rain floods"], "length")
    after = Caller(generator, "Stocks rally as", "after")
    scheduler.submit([after.sequence])
    assert after.result()[1] == "length"
    assert scheduler.reserved == 0 and scheduler.alive


def test_a_failing_session_run_ends_its_group_and_the_next_request_is_served(generator, scheduler, monkeypatch):
    step, failures = generator.decoder.step, []

    def failing_once(cache, last):
        if not failures:
            failures.append(1)
            raise RuntimeError("injected: onnxruntime failed")
        return step(cache, last)

    monkeypatch.setattr(generator.decoder, "step", failing_once)
    callers = [Caller(generator, "Seoul stocks", f"r{i}") for i in range(2)]
    scheduler.submit([c.sequence for c in callers])
    assert [c.result()[1] for c in callers] == [FINISH_ERROR, FINISH_ERROR]
    after = Caller(generator, "Seoul stocks", "after")
    scheduler.submit([after.sequence])
    assert after.result() == (alone(generator, "Seoul stocks"), "length")
    assert scheduler.reserved == 0


def test_a_failing_prefill_ends_only_the_prompt_at_fault(generator, scheduler, monkeypatch):
    bad_ids, _ = generator.tokenize("Heavy rain floods", False)
    prefill = generator.decoder.prefill

    def picky(prompts):
        if bad_ids in prompts:
            raise RuntimeError("injected: this prompt cannot be prefilled")
        return prefill(prompts)

    monkeypatch.setattr(generator.decoder, "prefill", picky)
    good, bad = Caller(generator, "Seoul stocks", "good"), Caller(generator, "Heavy rain floods", "bad")
    scheduler.submit([good.sequence, bad.sequence])  # prefilled together, then one by one
    assert bad.result()[1] == FINISH_ERROR
    assert good.result()[1] == "length"


class Crash(BaseException):
    """Not an Exception: what no per-step guard catches (a bug in the loop itself)."""


def test_a_dead_thread_fails_what_it_held_at_once_then_comes_back(generator, scheduler, monkeypatch):
    step, crashed = scheduler.decoding.step, []

    def crash_once():
        if not crashed and scheduler.decoding.active >= 2:
            crashed.append(1)
            raise Crash("the decoding thread dies")
        step()

    monkeypatch.setattr(scheduler.decoding, "step", crash_once)
    callers = [Caller(generator, "Seoul stocks", f"r{i}", tokens=100, watch=scheduler) for i in range(2)]
    scheduler.submit([c.sequence for c in callers])
    started = time.monotonic()
    for caller in callers:
        assert caller.result()[1] == FINISH_ERROR
        assert caller.alive_at_end is False  # readiness said NOT_SERVING while it was down
    assert time.monotonic() - started < 2  # nobody waited for a deadline
    deadline = time.monotonic() + 5
    while not scheduler.alive:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert scheduler.restarts == 1 and scheduler.reserved == 0
    after = Caller(generator, "Seoul stocks", "after")
    scheduler.submit([after.sequence])
    assert after.result()[1] == "length"


def test_a_cancelled_waiting_sequence_gives_back_its_share_without_a_free_row(generator):
    scheduler = Scheduler(Decoding(generator.decoder, generator.start_id), 1, 4096)
    scheduler.start()
    try:
        running = Caller(generator, "Seoul stocks", "running", tokens=100)
        scheduler.submit([running.sequence])
        waiting = Caller(generator, "Heavy rain floods", "waiting", tokens=100)
        scheduler.submit([waiting.sequence])
        held = scheduler.reserved
        waiting.sequence.cancelled = True
        deadline = time.monotonic() + 5
        while scheduler.reserved == held:  # the one row stays busy all the while
            assert time.monotonic() < deadline and not running.done.is_set()
            time.sleep(0.001)
        assert scheduler.reserved == Scheduler.cost(running.sequence)
    finally:
        running.sequence.cancelled = True
        scheduler.stop()


def test_metrics_that_raise_end_no_sequence(generator):
    def broken(record):
        raise RuntimeError("the metrics registry is broken")

    scheduler = Scheduler(Decoding(generator.decoder, generator.start_id), 8, 4096, broken)
    scheduler.start()
    try:
        caller = Caller(generator, "Seoul stocks", "r")
        scheduler.submit([caller.sequence])
        assert caller.result()[1] == "length"
    finally:
        scheduler.stop()
