"""Every task through every protocol gives the in-process pipeline's answer, value by value:
KServe v2 over gRPC (tritonclient), KServe v2 over HTTP (tritonclient's HTTP client, binary tensors,
and plain JSON), and the typed kiln.v1 API (kiln's client), against one running server."""

from __future__ import annotations

import concurrent.futures
import json
import urllib.request

import numpy as np
import pytest
from kiln.runtime import pipeline
from kiln.runtime.client import KilnClient
from servers import LAYOUTS, metric, running_server

TEXTS = ["Alice lives in Seoul.", "The central bank raised rates.", "한국은행이 금리를 올렸다.", "Great service."]
MASKED = ["The central [MASK] raised rates.", "Alice lives in [MASK]."]
QUESTIONS, CONTEXTS = (
    ["Where does Alice live?", "Who raised rates?"],
    ["Alice lives in Seoul.", "The bank raised rates."],
)
LABELS = ["politics", "economy", "sports"]


@pytest.fixture(scope="module")
def packages(task_packages, exported):
    return {**task_packages, "cls8": exported("bert", "text-classification", "int8")}


@pytest.fixture(scope="module", **LAYOUTS)
def server(packages, request):
    with running_server("--frontends", request.param, models=packages) as running:
        yield running


@pytest.fixture(scope="module")
def local(packages):
    return {name: pipeline(path) for name, path in packages.items()}


def _kserve_grpc(server, model: str, inputs: dict[str, list[str]], params: dict | None = None) -> dict:
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(server.address)
    tensors = []
    for name, values in inputs.items():
        tensor = tc.InferInput(name, [len(values)], "BYTES")
        tensor.set_data_from_numpy(np.array([v.encode() for v in values], dtype=object))
        tensors.append(tensor)
    result = client.infer(model, tensors, parameters=params)
    return {o.name: result.as_numpy(o.name) for o in result.get_response().outputs}


def _kserve_http(server, model: str, inputs: dict[str, list[str]], params: dict | None = None) -> dict:
    import tritonclient.http as th

    client = th.InferenceServerClient(server.http.removeprefix("http://"))
    tensors = []
    for name, values in inputs.items():
        tensor = th.InferInput(name, [len(values)], "BYTES")
        tensor.set_data_from_numpy(np.array([v.encode() for v in values], dtype=object))  # binary tensor data
        tensors.append(tensor)
    result = client.infer(model, tensors, parameters=params)
    return {o["name"]: result.as_numpy(o["name"]) for o in result.get_response()["outputs"]}


def _kserve_json(server, model: str, inputs: dict[str, list[str]], params: dict | None = None) -> dict:
    body = {
        "inputs": [{"name": n, "datatype": "BYTES", "shape": [len(v)], "data": v} for n, v in inputs.items()],
        "parameters": params or {},
    }
    request = urllib.request.Request(f"{server.http}/v2/models/{model}/infer", json.dumps(body).encode(), method="POST")
    reply = json.loads(urllib.request.urlopen(request, timeout=30).read())
    return {o["name"]: np.array(o["data"], dtype=object if o["datatype"] == "BYTES" else None).reshape(o["shape"])
            for o in reply["outputs"]}  # fmt: skip


PROTOCOLS = [_kserve_grpc, _kserve_http, _kserve_json]


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_classification(server, local, protocol):
    out = protocol(server, "cls", {"text": TEXTS})
    expected = local["cls"](TEXTS)
    assert [_text(x) for x in out["label"]] == [e["label"] for e in expected]
    assert np.allclose(out["score"].astype(float), [e["score"] for e in expected], atol=1e-6)
    assert np.allclose(out["logits"].astype(float), local["cls"].logits(TEXTS)[0], atol=1e-5)
    sigmoid = protocol(server, "cls", {"text": TEXTS}, {"function_to_apply": "sigmoid"})
    expected = local["cls"](TEXTS, function_to_apply="sigmoid")
    assert np.allclose(sigmoid["score"].astype(float), [e["score"] for e in expected], atol=1e-6)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_token_classification(server, local, protocol):
    out = protocol(server, "ner", {"text": TEXTS}, {"aggregation_strategy": "simple"})
    expected = local["ner"](TEXTS, aggregation_strategy="simple")
    assert [json.loads(_text(x)) for x in out["entities"]] == json.loads(json.dumps(expected))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_question_answering(server, local, protocol):
    out = protocol(server, "qa", {"question": QUESTIONS, "context": CONTEXTS})
    expected = local["qa"](QUESTIONS, CONTEXTS)
    assert [_text(x) for x in out["answer"]] == [e["answer"] for e in expected]
    assert out["start"].astype(int).tolist() == [e["start"] for e in expected]
    assert out["end"].astype(int).tolist() == [e["end"] for e in expected]
    assert np.allclose(out["score"].astype(float), [e["score"] for e in expected], atol=1e-6)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_feature_extraction(server, local, protocol):
    out = protocol(server, "emb", {"text": TEXTS})
    assert np.allclose(out["embedding"].astype(np.float32), local["emb"](TEXTS), atol=1e-6)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_fill_mask(server, local, protocol):
    out = protocol(server, "mlm", {"text": MASKED}, {"top_k": 3})
    assert [json.loads(_text(x)) for x in out["result"]] == json.loads(json.dumps(local["mlm"](MASKED, top_k=3)))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_zero_shot(server, local, protocol):
    out = protocol(server, "nli", {"text": TEXTS, "candidate_labels": LABELS}, {"multi_label": True})
    expected = local["nli"](TEXTS, LABELS, multi_label=True)
    assert [json.loads(_text(x)) for x in out["result"]] == json.loads(json.dumps(expected))


def test_typed_api_every_task(server, local):
    with KilnClient(server.address) as client:
        ranked = client.classify("cls", TEXTS, top_k=-1)
        expected = local["cls"](TEXTS, top_k=None)
        assert [[x["label"] for x in r["labels"]] for r in ranked] == [[x["label"] for x in e] for e in expected]
        scores = [[x["score"] for x in r["labels"]] for r in ranked]
        assert np.allclose(scores, [[x["score"] for x in e] for e in expected], atol=1e-6)
        tags = client.tag("ner", TEXTS, "first")
        expected = local["ner"](TEXTS, aggregation_strategy="first")
        assert [[(t["entity"], t["start"], t["end"], t["word"]) for t in r] for r in tags] == [
            [(e["entity_group"], e["start"], e["end"], e["word"]) for e in x] for x in expected
        ]
        answers = client.answer("qa", QUESTIONS, CONTEXTS, top_k=2)
        expected = local["qa"](QUESTIONS, CONTEXTS, top_k=2)
        assert [[(a["answer"], a["start"], a["end"]) for a in r] for r in answers] == [
            [(a["answer"], a["start"], a["end"]) for a in e] for e in expected
        ]
        vectors = client.embed("emb", TEXTS, normalize=True)
        assert np.allclose(vectors, local["emb"](TEXTS, normalize_embeddings=True), atol=1e-6)
        fills = client.fill_mask("mlm", MASKED, top_k=2)
        expected = local["mlm"](MASKED, top_k=2)
        assert [[f["token"] for f in r[0]] for r in fills] == [[f["token"] for f in e] for e in expected]
        zero = client.zero_shot("nli", TEXTS, LABELS)
        expected = local["nli"](TEXTS, LABELS)
        assert [[x["label"] for x in r["labels"]] for r in zero] == [e["labels"] for e in expected]
        assert np.allclose(
            [[x["score"] for x in r["labels"]] for r in zero], [e["scores"] for e in expected], atol=1e-6
        )


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_classification_request_runs_the_model_once_per_text(server, protocol):
    """Labels, scores and logits all come from one run (a KServe request once ran the model twice)."""
    rows = lambda: metric(server.metrics_url, "kiln_batch_size_sum", model="cls")  # noqa: E731
    before = rows()
    protocol(server, "cls", {"text": TEXTS})
    assert rows() - before == len(TEXTS)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_int8_logits_are_the_same_bits_alone_and_batched_with_other_callers(server, local, protocol):
    """Per-row int8: whatever the batcher merges a request with, its logits are those of its text alone."""
    texts = [f"{TEXTS[i % len(TEXTS)]} {'and then some ' * (i % 4)}{i}" for i in range(12)]
    alone = {text: local["cls8"].logits([text])[0][0] for text in texts}
    rows = lambda: metric(server.metrics_url, "kiln_batch_size_sum", model="cls8")  # noqa: E731
    batches = lambda: metric(server.metrics_url, "kiln_batch_size_count", model="cls8")  # noqa: E731
    before = rows(), batches()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda text: protocol(server, "cls8", {"text": [text]}), texts * 3))
    for text, reply in zip(texts * 3, replies, strict=True):
        assert np.array_equal(np.asarray(reply["logits"], dtype=np.float32)[0], alone[text])
    assert batches() - before[1] < rows() - before[0], "no two requests were batched together"


def test_tritonclient_and_kiln_client_in_one_process(server):
    """kiln's KServe protos live in their own descriptor pool: both import and work side by side."""
    import tritonclient.grpc as tc
    from kiln.proto import grpc_service_pb2
    from tritonclient.grpc import service_pb2

    assert grpc_service_pb2.ModelInferRequest.DESCRIPTOR.full_name == service_pb2.ModelInferRequest.DESCRIPTOR.full_name
    with KilnClient(server.address) as client:
        ours = client.infer("cls", {"text": TEXTS})
        assert client.task_of("cls") == "text-classification"
    theirs = _kserve_grpc(server, "cls", {"text": TEXTS})
    assert ours["label"] == [x.decode() for x in theirs["label"]]
    assert tc.InferenceServerClient(server.address).is_model_ready("cls")


def _typed(server, model: str, inputs: dict[str, list[str]], params: dict | None = None) -> dict:
    with KilnClient(server.address) as client:
        return {"answers": client.classify(model, inputs["text"], function_to_apply=(params or {}).get("fn", ""))}


@pytest.mark.parametrize(
    "protocol, refusal",
    [
        (_kserve_grpc, lambda send: send({"txt": TEXTS})),  # an input the task does not take
        (_kserve_http, lambda send: send({"text": TEXTS}, {"function_to_apply": "cube"})),  # a bad parameter
        (_kserve_json, lambda send: send({"text": []})),  # nothing to classify
        (_typed, lambda send: send({"text": TEXTS}, {"fn": "cube"})),
    ],
)
def test_a_refused_request_is_counted_once_in_metrics_and_triton_statistics(server, protocol, refusal):
    """An error-rate alert sees refusals: one refused request is one INVALID_ARGUMENT in the metrics
    and one failure in Triton's statistics, on every protocol."""
    import tritonclient.grpc as tc

    refused = lambda: metric(server.metrics_url, "kiln_requests_total", model="cls", code="INVALID_ARGUMENT")  # noqa: E731
    stats = lambda: tc.InferenceServerClient(server.address).get_inference_statistics("cls").model_stats[0]  # noqa: E731
    before, failed_before = refused(), stats().inference_stats.fail.count
    with pytest.raises(Exception, match=r"(?i)input|parameter|function_to_apply|text|400"):
        refusal(lambda inputs, params=None: protocol(server, "cls", inputs, params))
    assert refused() - before == 1
    assert stats().inference_stats.fail.count - failed_before == 1


def test_triton_statistics_count_every_request_once_per_stage(server):
    """As Triton counts them (perf_analyzer refuses statistics whose compute counts differ): a
    request of several texts, batched with others or not, is one count in each stage."""
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(server.address)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: _kserve_grpc(server, "cls", {"text": TEXTS}), range(24)))
    stats = client.get_inference_statistics("cls").model_stats[0].inference_stats
    counts = {
        stage: getattr(stats, stage).count for stage in ("queue", "compute_input", "compute_infer", "compute_output")
    }
    assert set(counts.values()) == {stats.success.count}, counts


@pytest.mark.parametrize("client", ["grpc", "http"])
def test_class_count_is_tritons_classification_extension(server, local, client):
    """tritonclient's `class_count` on an output: the top classes as "value:index:label", best first."""
    import tritonclient.grpc as tc
    import tritonclient.http as th

    triton = tc if client == "grpc" else th
    address = server.address if client == "grpc" else server.http.removeprefix("http://")
    tensor = triton.InferInput("text", [len(TEXTS)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=object))
    asked = [triton.InferRequestedOutput("logits", class_count=2), triton.InferRequestedOutput("label")]
    result = triton.InferenceServerClient(address).infer("cls", [tensor], outputs=asked)
    top = result.as_numpy("logits")
    assert top.shape == (len(TEXTS), 2)
    expected = local["cls"](TEXTS)
    for row, answer in zip(top, expected, strict=True):
        value, index, label = row[0].decode().split(":", 2)
        assert label == answer["label"] and int(index) >= 0 and float(value) >= float(row[1].decode().split(":")[0])
    with pytest.raises(Exception, match="classification"):
        asked = [triton.InferRequestedOutput("label", class_count=2)]  # a BYTES output has no classes to rank
        triton.InferenceServerClient(address).infer("cls", [tensor], outputs=asked)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_top_k_is_honoured_on_kserve_too(server, local, protocol):
    """top_k means on KServe what it means on kiln.v1 and in process: the k best, [N, k]."""
    out = protocol(server, "cls", {"text": TEXTS}, {"top_k": 2})
    expected = local["cls"](TEXTS, top_k=2)
    assert out["label"].shape == (len(TEXTS), 2)
    assert [[_text(x) for x in row] for row in out["label"]] == [[r["label"] for r in e] for e in expected]
    assert np.allclose(out["score"].astype(float), [[r["score"] for r in e] for e in expected], atol=1e-6)
    out = protocol(server, "qa", {"question": QUESTIONS, "context": CONTEXTS}, {"top_k": 3})
    expected = local["qa"](QUESTIONS, CONTEXTS, top_k=3)
    assert out["answer"].shape == (len(QUESTIONS), 3)
    assert [[_text(x) for x in row] for row in out["answer"]] == [[a["answer"] for a in e] for e in expected]
    assert out["start"].astype(int).tolist() == [[a["start"] for a in e] for e in expected]
