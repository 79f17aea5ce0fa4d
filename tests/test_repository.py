"""Triton's model repository: index, unload, load, control modes, and a version swap under load
that fails no request — driven through tritonclient (gRPC) and REST."""

from __future__ import annotations

import concurrent.futures
import shutil
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as tc
from servers import LAYOUTS, running_server
from test_http import http
from tritonclient.utils import InferenceServerException

TEXTS = ["Alice lives in Seoul.", "The central bank raised rates."]


@pytest.fixture(**LAYOUTS)
def layout(request) -> tuple[str, str]:
    """Every test on one process and on two front-ends before an engine (which owns the repository)."""
    return ("--frontends", request.param)


@pytest.fixture
def repository(exported, tmp_path):
    """cls/1 (numbered versions, as Triton lays them out) and emb (a package directly)."""
    root = tmp_path / "models"
    shutil.copytree(exported("bert", "text-classification"), root / "cls" / "1")
    shutil.copytree(exported("bert", "feature-extraction"), root / "emb")
    return root


def _infer(client: tc.InferenceServerClient, model: str = "cls"):
    tensor = tc.InferInput("text", [len(TEXTS)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=object))
    return client.infer(model, [tensor])


def test_index_unload_and_load(repository, layout):
    with running_server(
        "--model-repository", str(repository), "--model-control-mode", "explicit", "--load-model", "*", *layout
    ) as server:
        client = tc.InferenceServerClient(server.address)
        index = {m.name: (m.version, m.state) for m in client.get_model_repository_index().models}
        assert index == {"cls": ("1", "READY"), "emb": ("1", "READY")}
        client.unload_model("cls")
        assert not client.is_model_ready("cls") and client.is_model_ready("emb")
        with pytest.raises(InferenceServerException, match="unknown model 'cls'") as failure:
            _infer(client)
        assert failure.value.status() == "StatusCode.NOT_FOUND"
        body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}
        assert http("POST", f"{server.http}/v2/models/cls/infer", body)[0] == 404
        status, index = http("POST", f"{server.http}/v2/repository/index", {})
        assert status == 200 and {"name": "cls", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"} in index
        assert http("POST", f"{server.http}/v2/repository/models/cls/load", {})[0] == 200
        assert client.is_model_ready("cls") and _infer(client).as_numpy("label").shape == (2,)


def test_explicit_mode_loads_only_what_it_is_told(repository, layout):
    with running_server(
        "--model-repository", str(repository), "--model-control-mode", "explicit", "--load-model", "emb", *layout
    ) as server:
        client = tc.InferenceServerClient(server.address)
        assert client.is_model_ready("emb") and not client.is_model_ready("cls")
        client.load_model("cls")
        assert client.is_model_ready("cls")
        with pytest.raises(InferenceServerException, match="no model 'nope'"):
            client.load_model("nope")


def test_mode_none_refuses_load_and_unload(repository, layout):
    with running_server("--model-repository", str(repository), *layout) as server:
        client = tc.InferenceServerClient(server.address)
        assert client.is_model_ready("cls") and client.is_model_ready("emb")
        with pytest.raises(InferenceServerException, match="not allowed in model control mode 'none'"):
            client.unload_model("cls")
        assert http("POST", f"{server.http}/v2/repository/models/cls/unload", {})[0] == 400
        assert client.is_model_ready("cls")


def test_version_swap_under_load_fails_no_request(repository, exported, layout):
    flags = ("--model-repository", str(repository), "--model-control-mode", "explicit", "--load-model", "*")
    with running_server(*flags, *layout) as server:
        client = tc.InferenceServerClient(server.address)
        stop, outcomes, lock = threading.Event(), [], threading.Lock()

        def hammer() -> None:
            caller = tc.InferenceServerClient(server.address)
            while not stop.is_set():
                try:
                    _infer(caller)
                    result = "ok"
                except InferenceServerException as exc:
                    result = str(exc)
                with lock:
                    outcomes.append(result)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            workers = [pool.submit(hammer) for _ in range(8)]
            time.sleep(0.5)
            shutil.copytree(exported("bert", "text-classification", "int8"), repository / "cls" / "2")
            client.load_model("cls")  # returns once version 2 is warm and serving
            assert client.get_model_metadata("cls").versions == ["2"]
            time.sleep(0.5)
            stop.set()
            for worker in workers:
                worker.result()
        failures = [o for o in outcomes if o != "ok"]
        assert len(outcomes) > 50 and failures == [], failures[:3]
        config = client.get_model_config("cls").config
        assert config.parameters["precision"].string_value == "int8-dynamic"


def test_poll_mode_picks_up_new_models(repository, exported, layout):
    flags = ("--model-repository", str(repository), "--model-control-mode", "poll", "--repository-poll-secs", "0.3")
    with running_server(*flags, *layout) as server:
        client = tc.InferenceServerClient(server.address)
        assert not client.is_model_ready("ner")
        shutil.copytree(exported("bert", "token-classification"), repository / "ner" / "1")
        deadline = time.monotonic() + 30
        while not client.is_model_ready("ner") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.is_model_ready("ner")
        shutil.rmtree(repository / "emb")
        deadline = time.monotonic() + 30
        while client.is_model_ready("emb") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not client.is_model_ready("emb")
        with pytest.raises(InferenceServerException, match="not allowed in model control mode 'poll'"):
            client.load_model("ner")


def test_poll_mode_survives_a_broken_package(repository, exported, layout):
    """A package that cannot load is shown UNAVAILABLE with its reason; the poller goes on and loads
    the next model that appears."""
    flags = ("--model-repository", str(repository), "--model-control-mode", "poll", "--repository-poll-secs", "0.3")
    with running_server(*flags, *layout) as server:
        client = tc.InferenceServerClient(server.address)
        broken = repository / "broken" / "1"
        shutil.copytree(exported("bert", "text-classification"), broken)
        (broken / "model.onnx").write_bytes(b"not an onnx graph")
        deadline = time.monotonic() + 30
        while not _state(client, "broken") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _state(client, "broken")[0] == "UNAVAILABLE"
        shutil.copytree(exported("bert", "token-classification"), repository / "ner" / "1")
        while not client.is_model_ready("ner") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.is_model_ready("ner") and _infer(client).as_numpy("label").shape == (2,)


def _state(client: tc.InferenceServerClient, name: str) -> tuple[str, str] | None:
    entries = [m for m in client.get_model_repository_index().models if m.name == name]
    return (entries[0].state, entries[0].reason) if entries and entries[0].state != "LOADING" else None
