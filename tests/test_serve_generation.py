"""Generators served: Triton's decoupled streaming through tritonclient, Triton's generate extension
over HTTP (curl-style JSON and server-sent events), kiln.v1 Generate/GenerateStream; continuous
batching, cancellation, the KV cache budget and bad parameters, against one running server."""

from __future__ import annotations

import json
import queue
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from kiln.proto import kiln_pb2 as pb
from kiln.proto import kiln_pb2_grpc as pb_grpc
from kiln.runtime import pipeline
from servers import LAYOUTS, metric, running_server

GREEDY = {"max_new_tokens": 24, "do_sample": False}
PROMPT = "Seoul stocks"


@pytest.fixture(scope="module")
def packages(generator_package):
    return {"gpt": generator_package("gpt2"), "sum": generator_package("bart")}


@pytest.fixture(scope="module", **LAYOUTS)
def server(packages, request):
    """The same server as one process, and as two front-ends before an engine (`--frontends 2`):
    every test must pass on both."""
    with running_server("--max-cache-tokens", "2048", "--frontends", request.param, models=packages) as running:
        yield running


@pytest.fixture(scope="module")
def expected(packages) -> str:
    """The in-process pipeline's answer: every protocol must give exactly this."""
    return pipeline(packages["gpt"])(PROMPT, **GREEDY)[0]["generated_text"]


def triton_inputs(prompt: str, stream: bool, sampling: dict) -> list:
    import tritonclient.grpc as tc

    text = tc.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
    flag = tc.InferInput("stream", [1], "BOOL")
    flag.set_data_from_numpy(np.array([stream]))
    params = tc.InferInput("sampling_parameters", [1], "BYTES")
    params.set_data_from_numpy(np.array([json.dumps(sampling).encode()], dtype=object))
    return [text, flag, params]


def triton_stream(address: str, requests: list[tuple[str, str, dict]]) -> dict[str, list]:
    """Send requests (id, prompt, sampling) on one tritonclient stream; each id's responses in order."""
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(address)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    for request_id, prompt, sampling in requests:
        client.async_stream_infer("gpt", triton_inputs(prompt, True, sampling), request_id=request_id)
    responses: dict[str, list] = {request_id: [] for request_id, _, _ in requests}
    open_ids = set(responses)
    while open_ids:
        result, error = results.get(timeout=60)
        assert error is None, error
        response = result.get_response()
        responses[response.id].append(result)
        if response.parameters["triton_final_response"].bool_param:
            open_ids.discard(response.id)
    client.stop_stream()
    return responses


def text_of(results: list) -> str:
    return "".join(r.as_numpy("text_output")[0].decode() for r in results)


def test_tritonclient_streams_pieces_that_add_up(server, expected):
    responses = triton_stream(server.address, [("a", PROMPT, GREEDY)])["a"]
    assert len(responses) > 3  # one response per piece, not one at the end
    assert text_of(responses) == expected
    last = responses[-1].get_response().parameters
    assert last["finish_reason"].string_param in ("stop", "length")


def test_tritonclient_unary_infer_gives_the_whole_answer(server, expected):
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(server.address)
    result = client.infer("gpt", triton_inputs(PROMPT, False, GREEDY))
    assert result.as_numpy("text_output")[0].decode() == expected


def test_requests_on_one_stream_are_answered_side_by_side(server):
    """Two requests on one stream: the short one ends while the long one is still going."""
    requests = [
        ("long", PROMPT, {"max_new_tokens": 60, "min_new_tokens": 60, "do_sample": False}),
        ("short", "The central bank", {"max_new_tokens": 3, "do_sample": False}),
    ]
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(server.address)
    order: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: order.put((result, error)))
    for request_id, prompt, sampling in requests:
        client.async_stream_infer("gpt", triton_inputs(prompt, True, sampling), request_id=request_id)
    finals = []
    while len(finals) < 2:
        result, error = order.get(timeout=60)
        assert error is None
        if result.get_response().parameters["triton_final_response"].bool_param:
            finals.append(result.get_response().id)
    client.stop_stream()
    assert finals == ["short", "long"]


def http_post(url: str, body: dict) -> tuple[int, bytes]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_http_generate_and_server_sent_events(server, expected):
    body = {"text_input": PROMPT, "parameters": GREEDY}
    status, raw = http_post(f"{server.http}/v2/models/gpt/generate", body)
    assert status == 200
    answer = json.loads(raw)
    assert answer["text_output"] == expected and answer["finish_reason"] in ("stop", "length")
    status, raw = http_post(f"{server.http}/v2/models/gpt/generate_stream", body)
    events = [json.loads(line[len(b"data: ") :]) for line in raw.split(b"\n\n") if line.startswith(b"data: ")]
    assert status == 200 and len(events) > 3
    assert "".join(e["text_output"] for e in events) == expected
    assert events[-1]["usage"]["completion_tokens"] == answer["usage"]["completion_tokens"]


def test_kiln_v1_generate_and_stream(server, expected, packages):
    stub = pb_grpc.KilnStub(grpc.insecure_channel(server.address))
    request = pb.GenerateRequest(model="gpt", prompts=[PROMPT, "The central bank"], max_new_tokens=24, do_sample=False)
    results = stub.Generate(request).results
    assert results[0].text == expected
    assert results[1].text == pipeline(packages["gpt"])("The central bank", **GREEDY)[0]["generated_text"]
    chunks = list(
        stub.GenerateStream(pb.GenerateRequest(model="gpt", prompts=[PROMPT], max_new_tokens=24, do_sample=False))
    )
    assert "".join(c.text for c in chunks) == expected
    assert chunks[-1].finish_reason and chunks[-1].generated_tokens == results[0].generated_tokens
    summary = stub.Generate(pb.GenerateRequest(model="sum", prompts=["Seoul stocks rose. Rates held."])).results[0]
    expected_summary = pipeline(packages["sum"])("Seoul stocks rose. Rates held.")[0]["summary_text"]
    assert summary.text == expected_summary  # 4 beams by default, as the transformers pipeline


def test_bad_parameters_are_invalid_argument_naming_them(server):
    stub = pb_grpc.KilnStub(grpc.insecure_channel(server.address))
    for request, needle in [
        (pb.GenerateRequest(model="gpt", prompts=[PROMPT], temperature=-1.0), "temperature"),
        (pb.GenerateRequest(model="gpt", prompts=[PROMPT], top_p=2.0), "top_p"),
        (pb.GenerateRequest(model="gpt", prompts=[PROMPT, PROMPT]), "one prompt"),
    ]:
        with pytest.raises(grpc.RpcError) as error:
            list(stub.GenerateStream(request))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in error.value.details()
    status, raw = http_post(
        f"{server.http}/v2/models/gpt/generate", {"text_input": PROMPT, "parameters": {"top_k": "x"}}
    )
    assert status == 400 and "top_k" in json.loads(raw)["error"]
    responses = triton_stream(server.address, [("ok", PROMPT, {"max_tokens": 2})])
    assert responses["ok"]
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(server.address)
    errors: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: errors.put(error))
    client.async_stream_infer("gpt", triton_inputs(PROMPT, True, {"temperature": "hot"}), request_id="bad")
    error = errors.get(timeout=30)
    client.stop_stream()
    assert error is not None and "temperature" in str(error)


def test_cache_budget_refuses_and_a_cancelled_stream_frees_its_share(server):
    """--max-cache-tokens 2048: a stream reserving most of it makes the next big request
    RESOURCE_EXHAUSTED; once that stream is cancelled mid-way, the next one is served."""
    stub = pb_grpc.KilnStub(grpc.insecure_channel(server.address))
    big = pb.GenerateRequest(model="gpt", prompts=[PROMPT], max_new_tokens=120, min_new_tokens=120, do_sample=False)
    stream = stub.GenerateStream(big)
    first = next(stream)
    assert first.text is not None
    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(pb.GenerateRequest(model="gpt", prompts=[PROMPT] * 16, max_new_tokens=120))
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "KV cache" in error.value.details()
    stream.cancel()
    deadline = time.monotonic() + 10
    while True:  # the row is freed at the next decoding step
        try:
            stub.Generate(pb.GenerateRequest(model="gpt", prompts=[PROMPT] * 12, max_new_tokens=100))
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
            time.sleep(0.1)


def test_a_new_request_joins_the_running_batch(server):
    """Continuous batching: requests arriving while others run share their decoding steps."""
    stub = pb_grpc.KilnStub(grpc.insecure_channel(server.address))
    rows_before = metric(server.metrics_url, "kiln_decoding_rows_sum", model="gpt")
    steps_before = metric(server.metrics_url, "kiln_decoding_rows_count", model="gpt")
    start = threading.Barrier(6)
    request = pb.GenerateRequest(model="gpt", prompts=[PROMPT], max_new_tokens=100, min_new_tokens=100, do_sample=False)

    def call() -> None:
        start.wait()
        stub.Generate(request)

    threads = [threading.Thread(target=call) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rows = metric(server.metrics_url, "kiln_decoding_rows_sum", model="gpt") - rows_before
    steps = metric(server.metrics_url, "kiln_decoding_rows_count", model="gpt") - steps_before
    assert rows / steps > 2  # 6 x 100 tokens in far fewer than 600 steps


def test_deadline_stops_a_long_generation(server):
    stub = pb_grpc.KilnStub(grpc.insecure_channel(server.address))
    long = pb.GenerateRequest(model="gpt", prompts=[PROMPT], max_new_tokens=120, min_new_tokens=120, do_sample=False)
    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(long, timeout=0.01)  # 119 tokens of the tiny model take ~40 ms here
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 10  # the server stops the sequence too: its cache is let go
    while metric(server.metrics_url, "kiln_kv_cache_tokens", model="gpt") > 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)
