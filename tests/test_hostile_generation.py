"""Hostile requests to a served generator (issue 26's corpus), as any client would send them: each gets
an answer or a 4xx naming the problem, a greedy request right after is answered at once, a refused
request leaves the KV cache as it found it, beam search cannot outlive its deadline or starve another
model, and slow HTTP clients are dropped."""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from kiln.proto import kiln_pb2 as pb
from kiln.proto import kiln_pb2_grpc as pb_grpc
from servers import LAYOUTS, metric, running_server

DEEP = "[" * 990 + "]" * 990
BIG = {"text_input": ["서울 증시"] * 80, "max_tokens": 120}  # 80 x (4 + 120) KV cache tokens


@pytest.fixture(scope="module", **LAYOUTS)
def server(generator_package, exported, request):
    models = {"gen": generator_package("gpt2"), "cls": exported("bert", "text-classification")}
    flags = ("--max-cache-tokens", "16384", "--http-header-timeout", "1", "--http-body-timeout", "1")
    flags += ("--frontends", request.param)
    with running_server(*flags, models=models) as running:
        yield running


def post(url: str, body: str | bytes | dict, timeout: float = 60) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else (body if isinstance(body, str) else json.dumps(body)).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def assert_greedy_is_fast(server) -> None:
    started = time.monotonic()
    status, body = post(f"{server.http}/v2/models/gen/generate", {"text_input": "Seoul stocks", "max_tokens": 8})
    assert status == 200 and body["text_output"], body
    assert time.monotonic() - started < 1.0


# body (raw JSON where Python's json cannot write it), and what a 400 must name (None: answered)
HOSTILE = [
    ('{"text_input": "서울", "max_tokens": 8, "parameters": {"do_sample": true, "temperature": 1e-300}}', None),
    ('{"text_input": "서울", "max_tokens": 8, "parameters": {"do_sample": true, "temperature": 1e300}}', None),
    ('{"text_input": "", "max_tokens": 3}', None),
    ('{"text_input": "서울", "max_tokens": 8, "parameters": {"repetition_penalty": 1e-300}}', None),
    ('{"text_input": "서울", "max_tokens": 8, "parameters": {"repetition_penalty": 1e-40, "do_sample": true}}', None),
    ('{"text_input": "서울", "max_tokens": 8, "parameters": {"repetition_penalty": 1e40, "do_sample": true}}', None),
    ('{"text_input": "서울", "max_tokens": 8, "parameters": {"top_p": 1e-45, "do_sample": true}}', None),
    ('{"text_input": "서울", "max_tokens": 8, "parameters": {"top_k": 1000000000, "do_sample": true}}', None),
    ('{"text_input": "서울", "max_tokens": 8, "parameters": {"no_repeat_ngram_size": 1000000}}', None),
    ('{"text_input": "서울", "max_tokens": 8, "parameters": {"seed": 9223372036854775807, "do_sample": true}}', None),
    ('{"text_input": "서울", "max_tokens": 8, "parameters": {"num_beams": 16, "repetition_penalty": 1e30, '
     '"no_repeat_ngram_size": 1, "length_penalty": 10, "early_stopping": true, "min_tokens": 4}}', None),
    ('{"text_input": "서울", "max_tokens": 8, "parameters": {"min_tokens": 20}}', "min_new_tokens"),
    ('{"text_input": "서울", "max_tokens": 8, "parameters": {"stop": ' + json.dumps(["x"] * 1000) + "}}", "stop"),
    ('{"text_input": "서울", "max_tokens": 100000000000000000000000}', "64 bits"),
    ('{"text_input": "서울", "max_tokens": 1e23}', "max_tokens"),
    ('{"text_input": "서울", "max_tokens": 9223372036854775808}', "INT64"),
    ('{"text_input": "\\ud800", "max_tokens": 3}', "lone surrogate U+D800"),
    ('{"text_input": "서울", "parameters": {"temperature": Infinity, "do_sample": true}}', "Infinity"),
    ('{"text_input": "서울", "parameters": {"temperature": NaN}}', "NaN"),
    ('{"text_input": "서울", "parameters": {"seed": -1, "do_sample": true}}', "seed"),
    ('{"text_input": "서울", "parameters": {"length_penalty": 1e300, "num_beams": 2}}', "length_penalty"),
    ('{"text_input": "서울", "parameters": {"x": ' + DEEP + "}}", "nested deeper than 32"),
    ('{"text_input": "서울", "sampling_parameters": {"x": ' + "[" * 40 + "]" * 40 + "}}", "nested deeper than 32"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "named"), HOSTILE, ids=[f"hostile-{i}" for i in range(len(HOSTILE))])
def test_hostile_generate_requests_are_answered_or_refused_by_name(server, body, named):
    status, answer = post(f"{server.http}/v2/models/gen/generate", body)
    if named is None:
        assert status == 200 and "text_output" in answer, answer
    else:
        assert status == 400 and named in answer["error"], answer
    assert_greedy_is_fast(server)


def test_hostile_sampling_over_grpc_streams(server):
    """ModelStreamInfer (tritonclient) and kiln.v1 GenerateStream with the values that broke the loop."""
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(server.address)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    cases = {
        "tiny-temperature": ("서울", {"temperature": 1e-300, "do_sample": True, "max_tokens": 6}),
        "tiny-penalty": ("서울", {"repetition_penalty": 1e-300, "max_tokens": 6}),
        "empty": ("", {"max_tokens": 4}),
        "deep": ("서울", {"x": json.loads("[" * 30 + "]" * 30)}),
    }
    for request_id, (prompt, sampling) in cases.items():
        inputs = []
        for name, value, datatype in (
            ("text_input", prompt.encode(), "BYTES"),
            ("sampling_parameters", (json.dumps(sampling)[:-1] + (', "y": ' + DEEP + "}")
                                     if request_id == "deep" else json.dumps(sampling)).encode(), "BYTES"),
        ):  # fmt: skip
            tensor = tc.InferInput(name, [1], datatype)
            tensor.set_data_from_numpy(np.array([value], dtype=object))
            inputs.append(tensor)
        flag = tc.InferInput("stream", [1], "BOOL")
        flag.set_data_from_numpy(np.array([True]))
        client.async_stream_infer("gen", [*inputs, flag], request_id=request_id)
    finished, errors = set(), {}
    while len(finished) + len(errors) < len(cases):
        result, error = results.get(timeout=30)
        if error is not None:
            errors[str(error)] = error
            continue
        response = result.get_response()
        if response.parameters["triton_final_response"].bool_param:
            finished.add(response.id)
    client.stop_stream()
    assert finished == {"tiny-temperature", "tiny-penalty", "empty"}
    assert len(errors) == 1 and "nested deeper than 32" in next(iter(errors))
    stub = pb_grpc.KilnStub(grpc.insecure_channel(server.address))
    request = pb.GenerateRequest(model="gen", prompts=["서울"], max_new_tokens=6, do_sample=True, temperature=1e-300)
    chunks = list(stub.GenerateStream(request, timeout=30))
    assert chunks[-1].finish_reason in ("stop", "length")
    assert_greedy_is_fast(server)


def test_a_refused_multi_prompt_request_leaves_the_kv_cache_as_it_found_it(server):
    body = {"text_input": ["서울 증시"] * 200 + ["word " * 400], "max_tokens": 30}
    status, answer = post(f"{server.http}/v2/models/gen/generate", body)
    assert status == 400 and "prompt is 802 tokens" in answer["error"]
    # the whole budget is free at once: a request reserving 9,920 of its 16,384 tokens is served, where
    # the 6,800 the refused prompts would have held, had they been left generating, would make it a 429
    status, answer = post(f"{server.http}/v2/models/gen/generate", BIG)
    assert status == 200 and len(answer["text_output"]) == 80


def test_beam_search_keeps_its_deadline_and_another_model_stays_fast(server):
    stub = pb_grpc.KilnStub(grpc.insecure_channel(server.address))
    huge = pb.GenerateRequest(model="gen", prompts=["서울"] * 200, num_beams=16, max_new_tokens=120)
    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(huge, timeout=2)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "KV cache" in error.value.details()

    # 16 searches of 8 beams, ~1.2 s of work here alone: the 0.5 s deadline stops them
    beams = pb.GenerateRequest(model="gen", prompts=["서울"] * 16, num_beams=8, max_new_tokens=100, min_new_tokens=100)
    outcome: list = []
    searching = threading.Thread(target=lambda: outcome.append(_code_of(lambda: stub.Generate(beams, timeout=0.5))))
    searching.start()
    time.sleep(0.05)
    latencies = []
    with grpc.insecure_channel(server.address) as channel:
        classify = pb_grpc.KilnStub(channel).Classify
        while searching.is_alive():
            started = time.monotonic()
            classify(pb.ClassifyRequest(model="cls", texts=["The central bank raised rates."]), timeout=10)
            latencies.append(time.monotonic() - started)
    assert outcome == [grpc.StatusCode.DEADLINE_EXCEEDED]
    assert latencies and max(latencies) < 1.0, latencies
    # the searches stopped: their whole share comes back, and the budget serves a big request again
    deadline = time.monotonic() + 10
    while True:
        status, _ = post(f"{server.http}/v2/models/gen/generate", BIG)
        if status == 200:
            break
        assert status == 429 and time.monotonic() < deadline
        time.sleep(0.2)


def _code_of(call) -> grpc.StatusCode:
    try:
        call()
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


def test_what_were_500s_are_400s(server):
    for body, named in [
        ({"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 2], "data": [101, 2**63]}]}, "INT64"),
        ('{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ' + DEEP + "}]}", "nested"),
    ]:
        status, answer = post(f"{server.http}/v2/models/cls/infer", body)
        assert status == 400 and named in answer["error"], answer
    assert metric(server.metrics_url, "kiln_requests_total", code="INTERNAL") == 0


def _closed_within(sock: socket.socket, seconds: float) -> bytes | None:
    """What the server sent before closing, or None if it kept the connection open."""
    sock.settimeout(seconds)
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except TimeoutError:
        return None
    return received


def test_slow_http_clients_are_dropped(server):
    port = int(server.http.rsplit(":", 1)[1])
    trickling = []
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"POST /v2/models/gen/generate HTTP/1.1\r\nHost: kiln\r\n")  # and never the rest
        trickling.append(sock)
    slow_body = socket.create_connection(("127.0.0.1", port))
    slow_body.sendall(b'POST /v2/models/gen/generate HTTP/1.1\r\nHost: kiln\r\nContent-Length: 100\r\n\r\n{"text')
    started = time.monotonic()
    for sock in trickling:
        assert _closed_within(sock, 5) == b""  # header timeout 1 s: closed without an answer
    answer = _closed_within(slow_body, 5)
    assert answer is not None and answer.startswith(b"HTTP/1.1 408") and b"--http-body-timeout" in answer
    assert time.monotonic() - started < 5
    for sock in [*trickling, slow_body]:
        sock.close()
    assert_greedy_is_fast(server)


def _cache_empties(server) -> None:
    deadline = time.monotonic() + 10
    while metric(server.metrics_url, "kiln_kv_cache_tokens", model="gen") > 0:
        assert time.monotonic() < deadline, "a stream whose client left still holds the KV cache"
        time.sleep(0.05)


def test_stream_writers_whose_client_leaves_free_the_row(server):
    """The SSE writer (HTTP generate_stream) and ModelStreamInfer writing to a client that went away."""
    port = int(server.http.rsplit(":", 1)[1])
    body = json.dumps({"text_input": "서울", "max_tokens": 120, "parameters": {"min_tokens": 120}}).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        b"POST /v2/models/gen/generate_stream HTTP/1.1\r\nHost: kiln\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    sock.close()  # mid-stream
    _cache_empties(server)

    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(server.address)
    first: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: first.put((result, error)))
    text = tc.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array(["서울".encode()], dtype=object))
    sampling = tc.InferInput("sampling_parameters", [1], "BYTES")
    sampling.set_data_from_numpy(np.array([b'{"max_tokens": 120, "min_tokens": 120}'], dtype=object))
    flag = tc.InferInput("stream", [1], "BOOL")
    flag.set_data_from_numpy(np.array([True]))
    client.async_stream_infer("gen", [text, sampling, flag], request_id="leaving")
    _, error = first.get(timeout=30)
    assert error is None
    client.stop_stream(cancel_requests=True)
    _cache_empties(server)
    assert_greedy_is_fast(server)
