"""Fuzzing that stays, for generation: hypothesis over every generation parameter, alone and combined,
extremes and wrong types included, through the in-process pipeline and through each protocol (Triton's
generate over HTTP, ModelStreamInfer, kiln.v1, OpenAI's completions). Whatever arrives: an answer or kiln's own refusal
(InvalidInput / HTTP 400 / INVALID_ARGUMENT; RESOURCE_EXHAUSTED for the KV budget), never an internal
error, and the next request is answered. A fixed budget and seed keep `make test` fast and repeatable."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kiln.proto import kiln_pb2 as pb
from kiln.proto import kiln_pb2_grpc as pb_grpc
from kiln.runtime import pipeline
from kiln.runtime.errors import InvalidInput
from servers import metric, running_server


def budget(examples: int) -> settings:
    return settings(
        max_examples=int(os.environ.get("KILN_FUZZ_EXAMPLES", examples)),
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


extreme_floats = st.sampled_from([0.0, -0.0, 1e-300, 1e-45, 1e-3, 0.5, 1.0, 2.0, 1e30, 1e300, -1.0, -1e300])
extreme_ints = st.sampled_from([0, 1, 2, 4, 16, 17, 127, 128, 10**6, 10**9, 2**31 - 1, 2**63 - 1, -1, -(2**31)])
wrong = st.sampled_from(["x", None, [], {}, True, 1.5])
VALUES = {
    "max_new_tokens": st.integers(1, 6) | extreme_ints | wrong,
    "min_new_tokens": st.integers(0, 8) | extreme_ints | wrong,
    "do_sample": st.booleans() | wrong,
    "temperature": extreme_floats | st.floats(allow_nan=False, allow_infinity=False) | wrong,
    "top_k": extreme_ints | wrong,
    "top_p": extreme_floats | wrong,
    "seed": extreme_ints | wrong,
    "num_beams": st.integers(1, 4) | extreme_ints | wrong,
    "length_penalty": extreme_floats | wrong,
    "early_stopping": st.booleans() | wrong,
    "repetition_penalty": extreme_floats | wrong,
    "no_repeat_ngram_size": extreme_ints | wrong,
    "stop": st.lists(st.text(max_size=3), max_size=20) | st.text(max_size=3) | wrong,
}
parameters = st.fixed_dictionaries({}, optional=VALUES)
prompts = st.sampled_from(["Seoul stocks", "", " ", "서울 지하철", "a" * 200, "\u00e9\u0301 ok"])


def _small(params: dict) -> dict:
    """Keep generated lengths small so each example costs milliseconds: extremes of max_new_tokens are
    checked by their own examples, the rest generate at most 6 tokens with at most 4 beams."""
    params = dict(params)
    if isinstance(params.get("max_new_tokens"), int) and not isinstance(params["max_new_tokens"], bool):
        params["max_new_tokens"] = min(params["max_new_tokens"], 6) if params["max_new_tokens"] > 0 else -1
    else:
        params.setdefault("max_new_tokens", 4)
    if isinstance(params.get("num_beams"), int) and not isinstance(params["num_beams"], bool):
        params["num_beams"] = min(params["num_beams"], 4) if params["num_beams"] <= 16 else params["num_beams"]
    return params


@pytest.fixture(scope="module")
def gpt(generator_package):
    return pipeline(generator_package("gpt2"))


@budget(150)
@given(prompt=prompts, params=parameters)
def test_in_process_every_parameter_answers_or_is_refused(gpt, prompt, params):
    try:
        [answer] = gpt(prompt, **_small(params))
    except InvalidInput:
        return
    assert isinstance(answer["generated_text"], str)


@pytest.fixture(scope="module")
def server(generator_package):
    with running_server("--max-cache-tokens", "16384", models={"gen": generator_package("gpt2")}) as running:
        yield running


def _greedy_answered(server) -> None:
    started = time.monotonic()
    request = urllib.request.Request(
        f"{server.http}/v2/models/gen/generate",
        json.dumps({"text_input": "Seoul stocks", "max_tokens": 4}).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
    assert time.monotonic() - started < 1.0


@budget(60)
@given(prompt=prompts, params=parameters)
def test_triton_generate_over_http(server, prompt, params):
    body = json.dumps({"text_input": prompt, "parameters": _small(params)}).encode()
    request = urllib.request.Request(
        f"{server.http}/v2/models/gen/generate", body, {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            assert "text_output" in json.loads(response.read())
    except urllib.error.HTTPError as exc:
        assert exc.code in (400, 429), exc.read()


@budget(40)
@given(prompt=prompts, params=parameters)
def test_model_stream_infer(server, prompt, params):
    import queue

    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(server.address)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    text = tc.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
    sampling = tc.InferInput("sampling_parameters", [1], "BYTES")
    sampling.set_data_from_numpy(np.array([json.dumps(_small(params)).encode()], dtype=object))
    flag = tc.InferInput("stream", [1], "BOOL")
    flag.set_data_from_numpy(np.array([True]))
    client.async_stream_infer("gen", [text, sampling, flag], request_id="fuzz")
    try:
        while True:
            result, error = results.get(timeout=30)
            if error is not None:
                assert "internal error" not in str(error), error
                return
            if result.get_response().parameters["triton_final_response"].bool_param:
                return
    finally:
        client.stop_stream()


def _typed_request(prompt: str, params: dict) -> pb.GenerateRequest | None:
    """kiln.v1's typed fields take only their own types and sizes: other values cannot be sent at all."""
    request = pb.GenerateRequest(model="gen", prompts=[prompt])
    for name, value in _small(params).items():
        try:
            if name == "stop":
                request.stop.extend([value] if isinstance(value, str) else value)
            else:
                setattr(request, name, value)
        except (TypeError, ValueError):
            return None
    return request


@budget(60)
@given(prompt=prompts, params=parameters)
def test_kiln_v1_generate(server, prompt, params):
    request = _typed_request(prompt, params)
    if request is None:
        return
    stub = pb_grpc.KilnStub(grpc.insecure_channel(server.address))
    try:
        stub.Generate(request, timeout=30)
    except grpc.RpcError as exc:
        assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), exc.details()


OPENAI_FIELDS = {
    "max_tokens": st.integers(1, 6) | extreme_ints | wrong,
    "temperature": extreme_floats | wrong,
    "top_p": extreme_floats | wrong,
    "n": st.integers(1, 3) | extreme_ints | wrong,
    "stop": st.lists(st.text(max_size=3), max_size=20) | st.text(max_size=3) | wrong,
    "seed": extreme_ints | wrong,
    "echo": st.booleans() | wrong,
    "stream": st.booleans() | wrong,
    "stream_options": st.just({"include_usage": True}) | wrong,
    "presence_penalty": st.sampled_from([0, 0.0, 0.5]) | wrong,
    "logprobs": st.sampled_from([None, 0, 2]),
    "top_k": extreme_ints | wrong,
    "repetition_penalty": extreme_floats | wrong,
    "min_tokens": st.integers(0, 8) | extreme_ints | wrong,
    "prompt": prompts | st.lists(prompts, max_size=3) | wrong,
    "frobnicate": st.integers(),
}


@budget(60)
@given(body=st.fixed_dictionaries({"model": st.just("gen")}, optional=OPENAI_FIELDS))
def test_openai_completions(server, body):
    if isinstance(body.get("max_tokens"), int) and not isinstance(body["max_tokens"], bool):
        body["max_tokens"] = min(body["max_tokens"], 6)
    body.setdefault("prompt", "Seoul stocks")
    request = urllib.request.Request(
        f"{server.http}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            raw = response.read()
            if body.get("stream") is True:
                assert raw.rstrip().endswith(b"data: [DONE]") and b'"error"' not in raw, raw[-300:]
            else:
                assert "choices" in json.loads(raw)
    except urllib.error.HTTPError as exc:
        error = json.loads(exc.read())["error"]
        assert exc.code in (400, 429) and error["message"] and error["type"], error


def test_after_the_fuzzing_the_server_answers_and_counted_no_internal_error(server):
    _greedy_answered(server)
    assert metric(server.metrics_url, "kiln_requests_total", code="INTERNAL") == 0
