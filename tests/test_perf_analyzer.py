"""Triton's perf_analyzer, unmodified, drives every kind of kiln model: encoders with no flags at
all (random text through Triton's batch convention), zero-shot and generators with input data
written by `kiln.bench.perf_analyzer` (a generator streamed, as Triton's decoupled models are)."""

from __future__ import annotations

import pytest
import tritonclient.grpc as tc
from kiln.bench import perf_analyzer as pa
from servers import LAYOUTS, running_server

pytestmark = pytest.mark.skipif(pa.unusable() is not None, reason=str(pa.unusable()))


@pytest.fixture(scope="module", **LAYOUTS)
def served(task_packages, generator_package, request):
    models = {**task_packages, "gen": generator_package("gpt2")}
    with running_server("--frontends", request.param, models=models) as running:
        yield running


@pytest.mark.parametrize("name", ["cls", "ner", "qa", "emb"])
def test_perf_analyzer_needs_no_flags_for_an_encoder(served, name):
    before = _successes(served.address, name)
    level = pa.run(served.address, name, concurrency=2, quick=True)
    assert level.per_second > 0 and level.p50_us > 0
    assert _successes(served.address, name) - before >= 16


def test_perf_analyzer_over_rest(served):
    level = pa.run(served.http.split("://")[1], "cls", concurrency=2, protocol="http", quick=True)
    assert level.per_second > 0


def test_perf_analyzer_with_input_data_for_zero_shot_fill_mask_and_a_streamed_generator(served):
    texts = ["The central bank raised rates.", "The team won the final."]
    data = pa.input_data(texts, ["text", "candidate_labels"], generator=False)
    assert pa.run(served.address, "nli", concurrency=1, data=data, quick=True).per_second > 0
    config = tc.InferenceServerClient(served.address).get_model_config("mlm").config
    data = pa.input_data(texts, ["text"], generator=False, mask_token=config.parameters["mask_token"].string_value)
    assert pa.run(served.address, "mlm", concurrency=1, data=data, quick=True).per_second > 0
    data = pa.input_data(texts, ["text_input"], generator=True, max_tokens=4)
    before = _successes(served.address, "gen")
    assert pa.run(served.address, "gen", concurrency=2, data=data, streaming=True, quick=True).per_second > 0
    assert _successes(served.address, "gen") - before >= 16


def _successes(address: str, model: str) -> int:
    stats = tc.InferenceServerClient(address).get_inference_statistics(model).model_stats[0]
    return stats.inference_stats.success.count


def test_the_bench_delegates_its_sweep_to_perf_analyzer(served):
    """`kiln bench serve --url ... --perf-analyzer`: a timing row per protocol and level."""
    sweep = pa.bench_with_perf_analyzer(served.address, None, "cls", ["a text"], [1], lambda _: None, quick=True)
    rows = sweep["timings"]
    assert [(r["name"], r["setting"]) for r in rows] == [("cls, perf_analyzer grpc", "1 clients")]
    assert rows[0]["texts_per_s"] > 0 and rows[0]["p50_ms"] > 0
