"""kiln serve, as a real server in a subprocess on a loopback port, driven by real clients:
the typed kiln.v1 client, tritonclient[grpc], and raw gRPC stubs for malformed requests.

Raw KServe requests are built with tritonclient's own protobuf modules: kiln's generated
`inference` package and Triton's cannot share one process's descriptor pool, and the point is to
speak the protocol as Triton's clients do.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import struct
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
from kiln.proto import kiln_pb2
from kiln.runtime import pipeline
from kiln.runtime.client import KilnClient
from servers import LAYOUTS, burst, metric, running_server
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def packages(task_packages, exported):
    return {**task_packages, "cls8": exported("bert", "text-classification", "int8")}


@pytest.fixture(scope="module", **LAYOUTS)
def server(packages, request):
    """One process, and two front-ends before an engine (`--frontends 2`): every test on both."""
    with running_server("--max-queue-delay-ms", "20", "--frontends", request.param, models=packages) as running:
        yield running


TEXTS = ["Alice lives in Seoul.", "The central bank raised rates.", "한국은행이 금리를 올렸다.", "Great service."]


# ---- typed kiln.v1 API ---------------------------------------------------------------------------


def test_typed_api_answers_like_the_local_pipeline(server, packages):
    address, _, _ = server
    with KilnClient(address) as client:
        assert {m["name"] for m in client.models()} == set(packages)
        assert client.model("cls")["task"] == "text-classification"
        remote = client.classify("cls", TEXTS, top_k=2)
        local = pipeline(packages["cls"])(TEXTS, top_k=2)
        assert [[label["label"] for label in r["labels"]] for r in remote] == [[x["label"] for x in r] for r in local]
        assert np.allclose([r["labels"][0]["score"] for r in remote], [r[0]["score"] for r in local], atol=1e-5)

        tags = client.tag("ner", TEXTS, "simple")
        local_tags = pipeline(packages["ner"])(TEXTS, aggregation_strategy="simple")
        assert [[(e["entity"], e["start"], e["end"]) for e in t] for t in tags] == [
            [(e["entity_group"], e["start"], e["end"]) for e in t] for t in local_tags
        ]

        answers = client.answer("qa", ["Where does Alice live?"], ["Alice lives in Seoul."], top_k=2)
        local_answers = pipeline(packages["qa"])(["Where does Alice live?"], ["Alice lives in Seoul."], top_k=2)
        assert [a["answer"] for a in answers[0]] == [a["answer"] for a in local_answers[0]]

        vectors = np.array(client.embed("emb", TEXTS))
        assert np.allclose(vectors, pipeline(packages["emb"])(TEXTS), atol=1e-5)

        fills = client.fill_mask("mlm", ["The central [MASK] raised rates."], top_k=3)
        local_fills = pipeline(packages["mlm"])(["The central [MASK] raised rates."], top_k=3)
        assert [f["token"] for f in fills[0][0]] == [f["token"] for f in local_fills[0]]

        zero = client.zero_shot("nli", TEXTS, ["politics", "economy", "sports"])
        local_zero = pipeline(packages["nli"])(TEXTS, ["politics", "economy", "sports"])
        assert [[x["label"] for x in z["labels"]] for z in zero] == [z["labels"] for z in local_zero]


def test_typed_api_errors(server):
    address, _, _ = server
    with KilnClient(address) as client:
        for call, code in [
            (lambda: client.classify("nope", TEXTS), grpc.StatusCode.NOT_FOUND),
            (lambda: client.classify("cls", []), grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: client.classify("cls", [""]), grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: client.classify("ner", TEXTS), grpc.StatusCode.INVALID_ARGUMENT),  # wrong task
            (lambda: client.classify("cls", ["a", "b"], text_pairs=["c"]), grpc.StatusCode.INVALID_ARGUMENT),
        ]:
            with pytest.raises(grpc.RpcError) as failure:
                call()
            assert failure.value.code() == code, failure.value.details()
            assert failure.value.details()
        assert client.classify("cls", ["still serving"])


# ---- KServe v2 through the unmodified tritonclient -----------------------------------------------


def test_tritonclient_metadata_config_and_statistics(server):
    import tritonclient.grpc as tc

    address, _, _ = server
    client = tc.InferenceServerClient(address)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("cls") and not client.is_model_ready("nope")
    assert client.get_server_metadata().name == "kiln"
    metadata = client.get_model_metadata("cls")
    assert [i.name for i in metadata.inputs][:2] == ["text", "text_pair"]
    assert {"label", "score", "logits"} <= {o.name for o in metadata.outputs}
    config = client.get_model_config("cls").config
    assert config.name == "cls" and config.parameters["task"].string_value == "text-classification"
    client.infer("cls", [_text_input(tc, "text", TEXTS)])
    stats = client.get_inference_statistics("cls").model_stats[0]
    assert stats.inference_count >= len(TEXTS) and stats.inference_stats.success.count >= 1


def _text_input(tc, name: str, values: list[str]):
    tensor = tc.InferInput(name, [len(values)], "BYTES")
    tensor.set_data_from_numpy(np.array([v.encode() for v in values], dtype=object))
    return tensor


def test_tritonclient_infer_text_and_tokens(server, packages):
    import tritonclient.grpc as tc

    address, _, _ = server
    client = tc.InferenceServerClient(address)
    result = client.infer("cls", [_text_input(tc, "text", TEXTS)])
    local = pipeline(packages["cls"])(TEXTS)
    assert [x.decode() for x in result.as_numpy("label")] == [r["label"] for r in local]
    assert np.allclose(result.as_numpy("score"), [r["score"] for r in local], atol=1e-5)
    logits = result.as_numpy("logits")

    encoder = pipeline(packages["cls"]).encoder
    batch = encoder.pad(encoder.tokenize(TEXTS))
    inputs = []
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        tensor = tc.InferInput(name, list(batch.feeds[name].shape), "INT64")
        tensor.set_data_from_numpy(batch.feeds[name])
        inputs.append(tensor)
    raw = client.infer("cls", inputs, outputs=[tc.InferRequestedOutput("logits")])
    assert np.allclose(raw.as_numpy("logits"), logits, atol=1e-4)

    qa = client.infer(
        "qa",
        [
            _text_input(tc, "question", ["Where does Alice live?"]),
            _text_input(tc, "context", ["Alice lives in Seoul."]),
        ],
    )
    expected = pipeline(packages["qa"])(["Where does Alice live?"], ["Alice lives in Seoul."])[0]
    assert qa.as_numpy("answer")[0].decode() == expected["answer"]
    assert int(qa.as_numpy("start")[0]) == expected["start"]

    ner = client.infer("ner", [_text_input(tc, "text", TEXTS[:1])])
    assert json.loads(ner.as_numpy("entities")[0]) == json.loads(json.dumps(pipeline(packages["ner"])(TEXTS[:1])[0]))

    emb = client.infer("emb", [_text_input(tc, "text", TEXTS)])
    assert emb.as_numpy("embedding").shape == (len(TEXTS), 64)


def test_stream_infer_answers_each_message(server):
    import queue

    import tritonclient.grpc as tc

    address, _, _ = server
    client = tc.InferenceServerClient(address)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer("cls", [_text_input(tc, "text", TEXTS)])
    client.async_stream_infer("nope", [_text_input(tc, "text", TEXTS)])
    client.async_stream_infer("cls", [_text_input(tc, "text", TEXTS[:1])])
    outcomes = [results.get(timeout=30) for _ in range(3)]
    client.stop_stream()
    assert [error is None for _, error in outcomes] == [True, False, True]
    assert "unknown model 'nope'" in str(outcomes[1][1])


# ---- malformed requests: the right status, and the server keeps serving --------------------------


def _raw_infer(address: str, request: pb.ModelInferRequest, **kwargs):
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30, **kwargs)


def _bytes_tensor(name: str, values: list[bytes], shape: list[int] | None = None):
    raw = b"".join(struct.pack("<I", len(v)) + v for v in values)
    return pb.ModelInferRequest.InferInputTensor(name=name, datatype="BYTES", shape=shape or [len(values)]), raw


@pytest.mark.parametrize(
    ("build", "code", "needle"),
    [
        (lambda: ("cls", [("text", "FP32", [2], np.zeros(2, np.float32).tobytes())]), "INVALID_ARGUMENT", "BYTES"),
        (lambda: ("cls", [_bytes_tensor("text", [b"a", b"b"], [3])]), "INVALID_ARGUMENT", "holds 3 elements"),
        (lambda: ("cls", [("text", "BYTES", [1], struct.pack("<I", 10) + b"abc")]), "INVALID_ARGUMENT", "past the end"),
        (lambda: ("cls", [_bytes_tensor("wrong", [b"a"])]), "INVALID_ARGUMENT", "unknown input 'wrong'"),
        (lambda: ("qa", [_bytes_tensor("question", [b"a"])]), "INVALID_ARGUMENT", "missing input 'context'"),
        (lambda: ("nope", [_bytes_tensor("text", [b"a"])]), "NOT_FOUND", "unknown model"),
        (lambda: ("cls", [_bytes_tensor("text", [b"\xff\xfe bad"])]), "INVALID_ARGUMENT", "not valid UTF-8"),
        (
            lambda: ("cls", [("input_ids", "INT64", [1, 3], np.array([1, 99999, 2], np.int64).tobytes())]),
            "INVALID_ARGUMENT",
            "input_ids must be in [0, ",
        ),
    ],
)
def test_malformed_requests(server, build, code, needle):
    address, _, _ = server
    model, tensors = build()
    request = pb.ModelInferRequest(model_name=model)
    for tensor in tensors:
        if isinstance(tensor, tuple) and len(tensor) == 4:
            name, datatype, shape, raw = tensor
            tensor = (pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape), raw)
        request.inputs.append(tensor[0])
        request.raw_input_contents.append(tensor[1])
    with pytest.raises(grpc.RpcError) as failure:
        _raw_infer(address, request)
    assert failure.value.code().name == code
    assert needle in failure.value.details()
    ok = pb.ModelInferRequest(model_name="cls")
    tensor, raw = _bytes_tensor("text", [b"still fine"])
    ok.inputs.append(tensor)
    ok.raw_input_contents.append(raw)
    assert _raw_infer(address, ok).outputs


def test_unknown_version(server):
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException

    client = tc.InferenceServerClient(server[0])
    with pytest.raises(InferenceServerException, match="no version '7'"):
        client.infer("cls", [_text_input(tc, "text", TEXTS)], model_version="7")


# ---- batching, backpressure, deadlines, cancellation ---------------------------------------------


def test_concurrent_requests_are_merged_into_batches(server):
    address, metrics_url, _ = server
    before_batches = metric(metrics_url, "kiln_batch_size_count", model="cls")
    before_rows = metric(metrics_url, "kiln_batch_size_sum", model="cls")
    with KilnClient(address) as client, concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: client.classify("cls", [TEXTS[i % 4]]), range(48)))
    batches = metric(metrics_url, "kiln_batch_size_count", model="cls") - before_batches
    rows = metric(metrics_url, "kiln_batch_size_sum", model="cls") - before_rows
    assert rows == 48
    assert batches < 48, "no two requests were ever batched together"


def test_int8_model_batches_and_each_text_keeps_its_alone_answer(server):
    """Per-row int8 batches like fp32, and a text's scores are the same bits in any batch."""
    address, metrics_url, _ = server
    texts = [f"{TEXTS[i % 4]} {'and more ' * (i % 5)}{i}" for i in range(16)]
    with KilnClient(address) as client, concurrent.futures.ThreadPoolExecutor(8) as pool:
        alone = [client.classify("cls8", [text], top_k=-1) for text in texts]
        before = (
            metric(metrics_url, "kiln_batch_size_sum", model="cls8"),
            metric(metrics_url, "kiln_batch_size_count", model="cls8"),
        )
        together = list(pool.map(lambda text: client.classify("cls8", [text], top_k=-1), texts * 4))
    rows = metric(metrics_url, "kiln_batch_size_sum", model="cls8") - before[0]
    batches = metric(metrics_url, "kiln_batch_size_count", model="cls8") - before[1]
    assert rows == 64 and batches < rows, "no two int8 requests were ever batched together"
    assert together == alone * 4


def test_answers_are_the_same_alone_and_under_load(packages):
    """Alone, a batch runs on every core; under load, instances run side by side on one core each.
    Either way a text gets the same answer, bit for bit."""
    texts = [f"{TEXTS[i % 4]} {i}" for i in range(24)]
    # small batches, so two run side by side; every core for a batch alone, though the tiny model
    # would not gain from it (--lone-cores auto measures that and keeps it on one)
    flags = ("--instances", "2", "--max-batch-size", "2", "--lone-cores", "all")
    with running_server(*flags, models={"cls8": packages["cls8"]}) as (address, metrics_url, _):
        with KilnClient(address) as client, concurrent.futures.ThreadPoolExecutor(12) as pool:
            alone = [client.classify("cls8", [text], top_k=-1) for text in texts]
            loaded = list(pool.map(lambda text: client.classify("cls8", [text], top_k=-1), texts * 4))
        assert loaded == alone * 4
        assert metric(metrics_url, "kiln_batches_total", model="cls8", cores="all") >= len(texts)
        assert metric(metrics_url, "kiln_batches_total", model="cls8", cores="one") >= 1


@pytest.mark.parametrize("package", ["cls", "cls8"])
def test_full_queue_is_refused_then_recovers(packages, package):
    flags = ("--max-queue", "8", "--max-queue-delay-ms", "50", "--max-batch-size", "2")
    with (
        running_server(*flags, models={"cls": packages[package]}) as (address, metrics_url, _),
        KilnClient(address) as client,
        concurrent.futures.ThreadPoolExecutor(32) as pool,
    ):
        futures = [pool.submit(client.classify, "cls", TEXTS * 2) for _ in range(32)]
        codes = []
        for future in futures:
            try:
                future.result()
                codes.append("OK")
            except grpc.RpcError as exc:
                codes.append(exc.code().name)
        assert "RESOURCE_EXHAUSTED" in codes and "OK" in codes
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}
        assert metric(metrics_url, "kiln_requests_total", model="cls", code="RESOURCE_EXHAUSTED") >= 1
        assert client.classify("cls", TEXTS)  # recovered once the load is gone


def _dropped_work_never_ran(metrics_url: str, codes: list[str]) -> None:
    """Some calls were not answered (their deadline passed or their caller left while they queued, or
    before the server read them), and their texts never ran: fewer rows ran than were sent (one text a
    call), though every call the server answered did run. (A call taken into a batch just before its
    deadline still runs; one still queued when it passes never does.)"""
    assert codes.count("OK") < len(codes), codes
    ran = metric(metrics_url, "kiln_batch_size_sum", model="cls")
    assert metric(metrics_url, "kiln_requests_total", model="cls", code="OK") <= ran < len(codes)


# one text a batch, so 64 calls arriving together queue behind each other: the later ones are still
# waiting when their deadline passes or their caller leaves
QUEUED = ("--max-batch-size", "1", "--instances", "1", "--max-queue-delay-ms", "300")


def test_deadline_exceeded_and_work_not_run(packages):
    with running_server(*QUEUED, models={"cls": packages["cls"]}) as (address, metrics_url, _):
        request = kiln_pb2.ClassifyRequest(model="cls", texts=TEXTS[:1])
        codes = burst(address, "Classify", [request] * 64, timeout=0.01)
        time.sleep(0.5)
        _dropped_work_never_ran(metrics_url, codes)
        with KilnClient(address) as client:
            assert client.classify("cls", TEXTS)


def test_cancelled_call_is_dropped(packages):
    with running_server(*QUEUED, models={"cls": packages["cls"]}) as (address, metrics_url, _):
        request = kiln_pb2.ClassifyRequest(model="cls", texts=TEXTS[:1])
        codes = burst(address, "Classify", [request] * 64, 10, cancel_after=0.005)
        time.sleep(0.5)
        assert "CANCELLED" in codes
        _dropped_work_never_ran(metrics_url, codes)
        with KilnClient(address) as client:
            assert client.classify("cls", TEXTS)


def test_a_lone_request_does_not_wait_for_company(packages):
    """With a 300 ms queue delay, a request alone on an idle model runs at once: nothing could join it."""
    flags = ("--max-queue-delay-ms", "300")
    with running_server(*flags, models={"cls": packages["cls"]}) as (address, _, _), KilnClient(address) as client:
        client.classify("cls", TEXTS)
        started = time.monotonic()
        for _ in range(5):
            client.classify("cls", TEXTS)
        assert (time.monotonic() - started) / 5 < 0.15


# ---- security ------------------------------------------------------------------------------------


def test_bearer_token(packages):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with running_server("--auth-token", "s3cret", models={"cls": packages["cls"]}) as (address, _, _):
        with KilnClient(address) as client, pytest.raises(grpc.RpcError) as failure:
            client.classify("cls", TEXTS)
        assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with KilnClient(address, token="wrong") as client, pytest.raises(grpc.RpcError):
            client.classify("cls", TEXTS)
        with KilnClient(address, token="s3cret") as client:
            assert client.classify("cls", TEXTS)
        with grpc.insecure_channel(address) as channel:  # probes need no token
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="cls"))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_tls(packages, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    with running_server(models={"cls": packages["cls"]}, tls=(cert, key)) as (address, _, _):
        with KilnClient(address, tls_ca=cert) as client:
            assert client.classify("cls", TEXTS)
        with KilnClient(address, timeout=2) as plain, pytest.raises(grpc.RpcError):
            plain.classify("cls", TEXTS)


def test_oversize_message(packages):
    with (
        running_server("--max-message-mb", "0.01", models={"cls": packages["cls"]}) as (address, _, _),
        KilnClient(address) as client,
    ):
        with pytest.raises(grpc.RpcError) as failure:
            client.classify("cls", ["word " * 1000] * 5)
        assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert client.classify("cls", TEXTS)


# ---- health, reflection, shutdown ----------------------------------------------------------------


def test_health_and_reflection(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    address, _, _ = server
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "cls", "ner"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == 1
        with pytest.raises(grpc.RpcError) as failure:
            health.Check(health_pb2.HealthCheckRequest(service="nope"))
        assert failure.value.code() == grpc.StatusCode.NOT_FOUND
        watch = health.Watch(health_pb2.HealthCheckRequest(service="cls"), timeout=5)  # clients balance on this
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in reply.list_services_response.service}
        assert {"inference.GRPCInferenceService", "kiln.v1.Kiln", "grpc.health.v1.Health"} <= names
        for symbol in ("inference.GRPCInferenceService", "kiln.v1.Kiln"):  # what grpcurl asks for
            request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
            reply = next(stub.ServerReflectionInfo(iter([request])))
            assert reply.file_descriptor_response.file_descriptor_proto, symbol


def test_graceful_shutdown_loses_no_accepted_call(packages):
    with running_server("--max-queue-delay-ms", "50", models={"cls": packages["cls"]}) as (address, _, process):
        with KilnClient(address) as client, concurrent.futures.ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(client.classify, "cls", TEXTS) for _ in range(16)]
            time.sleep(0.02)
            process.send_signal(signal.SIGTERM)
            results = [f.result() for f in futures]  # every accepted call completes
            assert all(len(r) == len(TEXTS) for r in results)
        assert process.wait(timeout=30) == 0
        log = process.stderr.read()
        assert "draining" in log and "stopped" in log


def test_structured_logs(packages):
    with running_server("--log-format", "json", models={"cls": packages["cls"]}) as (_, _, process):
        pass
    lines = [json.loads(line) for line in process.stderr.read().splitlines() if line.startswith("{")]
    loaded = next(line for line in lines if line["msg"] == "model loaded")
    assert loaded["model"] == "cls" and loaded["precision"] == "fp32" and "load_s" in loaded
    assert loaded["provider"] == "CPUExecutionProvider" and loaded["warm_up_s"] >= 0


def test_generated_code_is_current():
    result = subprocess.run([sys.executable, "-m", "kiln.proto.generate", "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


FIELDS_SCRIPT = """
import json, sys
module = __import__(sys.argv[1], fromlist=["DESCRIPTOR"])
out = {}
def walk(message):
    out[message.full_name] = {f.name: [f.number, f.type] for f in message.fields}
    for nested in message.nested_types:
        walk(nested)
for message in module.DESCRIPTOR.message_types_by_name.values():
    walk(message)
service = module.DESCRIPTOR.services_by_name.get("GRPCInferenceService")
methods = {m.name: m.input_type.full_name for m in service.methods} if service else {}
print(json.dumps({"messages": out, "methods": methods}))
"""


def _descriptor(module: str) -> dict:
    """Fields of a generated module, read in a fresh interpreter (see the module docstring)."""
    result = subprocess.run([sys.executable, "-c", FIELDS_SCRIPT, module], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def test_wire_compatible_with_tritonclient():
    """Every field kiln declares has the number and type Triton's own descriptors give it."""
    ours = _descriptor("kiln.proto.grpc_service_pb2")
    theirs = _descriptor("tritonclient.grpc.service_pb2")
    theirs["messages"].update(_descriptor("tritonclient.grpc.model_config_pb2")["messages"])
    assert len(ours["messages"]) > 20
    for message, fields in ours["messages"].items():
        assert message in theirs["messages"], message
        for name, signature in fields.items():
            assert theirs["messages"][message].get(name) == signature, (message, name)
    for method, input_type in ours["methods"].items():
        assert theirs["methods"][method] == input_type


@pytest.fixture(autouse=True, scope="module")
def _no_proxy():
    os.environ["no_proxy"] = "127.0.0.1,localhost"
    yield
