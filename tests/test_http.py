"""HTTP on its own port: KServe v2 REST errors and health, OpenAI embeddings through the `openai`
client and curl, the metrics port serving /metrics only, and the bearer token over HTTP."""

from __future__ import annotations

import base64
import json
import subprocess
import urllib.error
import urllib.request

import numpy as np
import pytest
from kiln.runtime import pipeline
from servers import LAYOUTS, running_server

TEXTS = ["Alice lives in Seoul.", "The central bank raised rates.", "한국은행이 금리를 올렸다."]


@pytest.fixture(scope="module")
def packages(exported):
    return {"cls": exported("bert", "text-classification"), "emb": exported("bert", "feature-extraction")}


@pytest.fixture(scope="module", **LAYOUTS)
def server(packages, request):
    with running_server("--frontends", request.param, models=packages) as running:
        yield running


def http(method: str, url: str, body: object | None = None, headers: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
    request = urllib.request.Request(url, data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read() or b"{}")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def test_health_metadata_and_config(server):
    assert http("GET", f"{server.http}/v2/health/live") == (200, {"live": True})
    assert http("GET", f"{server.http}/v2/health/ready") == (200, {"ready": True})
    status, meta = http("GET", f"{server.http}/v2")
    assert status == 200 and meta["name"] == "kiln" and "model_repository" in meta["extensions"]
    status, model = http("GET", f"{server.http}/v2/models/cls/versions/1")
    assert status == 200 and model["outputs"][2] == {"name": "logits", "datatype": "FP32", "shape": [-1, 4]}
    status, model = http("GET", f"{server.http}/v2/models/emb")
    assert [(o["name"], o["shape"]) for o in model["outputs"]] == [("embedding", [-1, 64])]
    assert [(i["name"], i["shape"]) for i in model["inputs"]] == [("text", [-1, 1])]  # Triton's batch convention
    # the token-id path's graph tensors are named in the config, not listed (perf_analyzer would ask for them)
    status, config = http("GET", f"{server.http}/v2/models/emb/config")
    assert config["max_batch_size"] > 0 and config["input"][0]["dims"] == [1]
    assert config["parameters"]["token_outputs"]["string_value"] == "last_hidden_state"
    assert "input_ids" in config["parameters"]["token_inputs"]["string_value"].split(",")
    assert http("GET", f"{server.http}/v2/models/cls/ready")[0] == 200
    status, config = http("GET", f"{server.http}/v2/models/cls/config")
    assert status == 200 and config["parameters"]["task"]["string_value"] == "text-classification"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["one"]}]}, "holds 2 elements"),
        ({"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": [1.0]}]}, "must be BYTES"),
        ({"inputs": [{"name": "txt", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}, "unknown input 'txt'"),
        ({"inputs": []}, "'inputs' must be a non-empty list"),
        ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [], "data": ["x"]}]}, "scalar shape"),
        (
            {
                "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["x"]}],
                "parameters": {"top_k": "2"},
            },
            "parameter 'top_k' must be an integer",
        ),
        (b"{not json", "not valid JSON"),
    ],
)
def test_bad_requests_are_400_naming_the_problem(server, body, needle):
    status, reply = http("POST", f"{server.http}/v2/models/cls/infer", body)
    assert status == 400 and needle in reply["error"], reply


def test_unknown_model_and_path_are_404(server):
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}
    status, reply = http("POST", f"{server.http}/v2/models/nope/infer", body)
    assert status == 404 and "unknown model 'nope'" in reply["error"]
    assert http("GET", f"{server.http}/v2/models/nope/ready")[0] == 503
    assert http("GET", f"{server.http}/v3/whatever")[0] == 404


def test_metrics_port_serves_metrics_only(server):
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    assert "kiln_requests_total" in text and "process_resident_memory_bytes" in text
    base = server.metrics_url.removesuffix("/metrics")
    for path in ("/v2/health/ready", "/", "/metricsx"):
        with pytest.raises(urllib.error.HTTPError) as failure:
            urllib.request.urlopen(base + path, timeout=5)
        assert failure.value.code == 404


def test_openai_client_embeddings(server, packages):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.http}/v1", api_key="unused")
    reply = client.embeddings.create(model="emb", input=TEXTS)
    vectors = np.array([d.embedding for d in reply.data])
    assert np.allclose(vectors, pipeline(packages["emb"])(TEXTS), atol=1e-6)
    assert [d.index for d in reply.data] == [0, 1, 2] and reply.usage.prompt_tokens > len(TEXTS)
    one = client.embeddings.create(model="emb", input=TEXTS[0], encoding_format="base64")
    assert np.allclose(np.frombuffer(base64.b64decode(one.data[0].embedding), "<f4"), vectors[0], atol=1e-6)


def test_curl_embeddings_and_errors(server, packages):
    def curl(path: str, body: dict) -> tuple[int, dict]:
        result = subprocess.run(
            ["curl", "-s", "-w", "\n%{http_code}", "-H", "Content-Type: application/json", "-d", json.dumps(body),
             f"{server.http}{path}"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        payload, code = result.stdout.rsplit("\n", 1)
        return int(code), json.loads(payload)

    code, reply = curl(
        "/v1/embeddings", {"model": "emb", "input": "Alice lives in Seoul.", "encoding_format": "base64"}
    )
    vector = np.frombuffer(base64.b64decode(reply["data"][0]["embedding"]), dtype="<f4")
    assert code == 200 and np.allclose(vector, pipeline(packages["emb"])(["Alice lives in Seoul."])[0], atol=1e-6)
    assert curl("/v1/embeddings", {"model": "cls", "input": "x"})[0] == 400  # not an embedding model
    assert curl("/v1/embeddings", {"model": "emb", "input": []})[0] == 400
    assert curl("/v1/embeddings", {"model": "nope", "input": "x"})[0] == 404
    code, reply = curl(
        "/v2/models/cls/infer", {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}
    )
    assert code == 200 and reply["outputs"][0]["name"] == "label"


def test_bearer_token_over_http(packages):
    with running_server("--auth-token", "s3cret", models={"cls": packages["cls"]}) as running:
        body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}
        url = f"{running.http}/v2/models/cls/infer"
        assert http("POST", url, body)[0] == 401
        assert http("POST", url, body, {"Authorization": "Bearer wrong"})[0] == 401
        assert http("POST", url, body, {"Authorization": "Bearer s3cret"})[0] == 200
        assert http("GET", f"{running.http}/v2/health/ready")[0] == 200  # probes need no token
