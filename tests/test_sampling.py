"""Sampling and generation settings at their extremes: every value a request may send either
generates or is refused by name with its range, and nothing a request sends turns a row into NaN."""

from __future__ import annotations

import numpy as np
import pytest
from kiln.runtime import pipeline
from kiln.runtime.errors import InvalidInput
from kiln.runtime.generation.logits import sample, warp
from kiln.runtime.generation.settings import Settings

ROW = np.array([3.0, 1.0, -2.0, 0.5, 2.9], dtype=np.float32)


@pytest.mark.parametrize("temperature", [1e-300, 1e-45, 1e-3, 1.0, 7.0, 1e38, 1e300])
def test_any_finite_temperature_gives_a_distribution(temperature):
    scores = warp(ROW, Settings(do_sample=True, temperature=temperature, top_k=0))
    assert not np.isnan(scores).any()
    token = sample(scores, np.random.default_rng(0))
    assert 0 <= token < len(ROW)
    if temperature <= 1e-3:  # the limit is greedy
        assert token == int(np.argmax(ROW))


def test_tiny_top_p_keeps_the_best_token():
    scores = warp(ROW, Settings(do_sample=True, top_p=1e-45, top_k=0))
    assert np.isfinite(scores).sum() == 1 and sample(scores, np.random.default_rng(1)) == 0


def test_penalties_that_overflowed_to_infinity_still_sample():
    """A repetition penalty of 1e-40 divides positive scores into +inf: those tokens share the draw."""
    row = np.array([np.inf, 1.0, np.inf, -np.inf, np.nan], dtype=np.float32)
    draws = {sample(warp(row, Settings(do_sample=True, top_k=0)), np.random.default_rng(seed)) for seed in range(40)}
    assert draws == {0, 2}


def test_a_row_with_every_token_banned_gives_what_greedy_gives():
    row = np.full(5, -np.inf, dtype=np.float32)
    assert sample(warp(row, Settings(do_sample=True)), np.random.default_rng(0)) == int(np.argmax(row))


@pytest.fixture(scope="module")
def gpt(generator_package):
    return pipeline(generator_package("gpt2"))


@pytest.mark.parametrize(
    "params",
    [
        {"do_sample": True, "temperature": 1e-300},
        {"do_sample": True, "temperature": 1e300},
        {"do_sample": True, "top_p": 1e-45},
        {"do_sample": True, "repetition_penalty": 1e-40},
        {"do_sample": True, "repetition_penalty": 1e40},
        {"repetition_penalty": 1e-40},
        {"do_sample": True, "top_k": 10**9},
        {"no_repeat_ngram_size": 10**6},
        {"do_sample": True, "seed": 2**63 - 1},
        {"do_sample": True, "seed": 0},
        {"num_beams": 16, "length_penalty": 10.0, "repetition_penalty": 1e30, "no_repeat_ngram_size": 1},
        {"num_beams": 3, "early_stopping": True, "min_new_tokens": 4, "stop": ["a"] * 16},
    ],
)
def test_extreme_values_generate(gpt, params):
    answer = gpt("Seoul stocks", max_new_tokens=6, **params)[0]["generated_text"]
    assert answer.startswith("Seoul stocks")


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"temperature": float("inf")}, "'temperature' must be a finite number"),
        ({"temperature": float("nan")}, "'temperature' must be a finite number"),
        ({"temperature": 10**400}, "'temperature' must be a finite number"),
        ({"temperature": -1.0}, "'temperature' is out of range"),
        ({"top_p": 0.0}, "0 < top_p <= 1"),
        ({"repetition_penalty": 0.0}, "'repetition_penalty' is out of range: 0.0 (must be > 0)"),
        ({"length_penalty": 1e300, "num_beams": 2}, "'length_penalty' is out of range: 1e+300 (-10 to 10)"),
        ({"top_k": -1}, "'top_k' is out of range"),
        ({"seed": 2**63}, "(0 to 2**63 - 1)"),
        ({"seed": -1}, "'seed' is out of range"),
        ({"max_new_tokens": 10**23}, "'max_new_tokens' is out of range"),
        ({"max_new_tokens": 4, "min_new_tokens": 5}, "'min_new_tokens' (5) is more than 'max_new_tokens' (4)"),
        ({"stop": ["x"] * 17}, "'stop' has 17 strings; the limit is 16"),
        ({"stop": ["x" * 129]}, "over 128 characters"),
        ({"num_beams": 17}, "(1 to 16)"),
        ({"num_beams": 2, "do_sample": True}, "beam sampling"),
    ],
)
def test_out_of_range_values_are_refused_by_name(gpt, params, needle):
    with pytest.raises(InvalidInput) as error:
        gpt("Seoul stocks", max_new_tokens=params.pop("max_new_tokens", 6), **params)
    assert needle in str(error.value)
