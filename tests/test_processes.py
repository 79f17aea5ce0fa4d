"""`kiln serve --frontends N`: front-end processes sharing the ports before one engine process.
Every test runs the real layout (a supervisor, an engine, front-ends) and drives it with the
clients users run; faults are injected with kill -9."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from kiln.proto import kiln_pb2
from kiln.runtime import pipeline
from kiln.runtime.client import KilnClient
from servers import burst, metric, running_server

TEXTS = ["Alice lives in Seoul.", "The central bank raised rates.", "한국은행이 금리를 올렸다.", "Great service."]


@pytest.fixture(scope="module")
def served(task_packages):
    with running_server("--frontends", "2", "--max-queue-delay-ms", "5", models=task_packages) as running:
        _wait_for(lambda: len(_children(running.process.pid, "kiln-frontend")) == 2)
        yield running


def _children(pid: int, prefix: str) -> list[int]:
    """The supervisor's live children whose process name starts with `prefix`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            name = (stat.parent / "comm").read_text().strip()
            state, parent = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue
        if int(parent) == pid and name.startswith(prefix) and state != "Z":  # a zombie is dead, not yet reaped
            found.append(int(stat.parent.name))
    return found


def _wait_for(condition, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def _classify_once(address: str, timeout: float = 10) -> str:
    """One call on a fresh connection (the kernel spreads connections over the front-ends)."""
    try:
        with KilnClient(address, timeout=timeout) as client:
            client.classify("cls", ["hello"])
        return "OK"
    except grpc.RpcError as exc:
        return exc.code().name


def test_every_protocol_answers_as_the_single_process(served, task_packages):
    import tritonclient.grpc as tc
    import tritonclient.http as th

    address = served.address
    with KilnClient(address) as client:
        remote = client.classify("cls", TEXTS, top_k=2)
        local = pipeline(task_packages["cls"])(TEXTS, top_k=2)
        assert [[x["label"] for x in r["labels"]] for r in remote] == [[x["label"] for x in r] for r in local]
        assert np.allclose([r["labels"][0]["score"] for r in remote], [r[0]["score"] for r in local], atol=1e-6)
        assert np.allclose(client.embed("emb", TEXTS), pipeline(task_packages["emb"])(TEXTS), atol=1e-6)
        tags = client.tag("ner", TEXTS, "simple")
        local_tags = pipeline(task_packages["ner"])(TEXTS, aggregation_strategy="simple")
        assert [[(e["entity"], e["start"]) for e in t] for t in tags] == [
            [(e["entity_group"], e["start"]) for e in t] for t in local_tags
        ]
        answers = client.answer("qa", ["Where does Alice live?"], ["Alice lives in Seoul."], top_k=2)
        local_answers = pipeline(task_packages["qa"])(["Where does Alice live?"], ["Alice lives in Seoul."], top_k=2)
        assert [a["answer"] for a in answers[0]] == [a["answer"] for a in local_answers[0]]
        fills = client.fill_mask("mlm", ["The central [MASK] raised rates."], top_k=3)
        local_fills = pipeline(task_packages["mlm"])(["The central [MASK] raised rates."], top_k=3)
        assert [f["token"] for f in fills[0][0]] == [f["token"] for f in local_fills[0]]
        zero = client.zero_shot("nli", TEXTS, ["politics", "economy"])
        assert [z["labels"][0]["label"] for z in zero] == [
            z["labels"][0] for z in pipeline(task_packages["nli"])(TEXTS, ["politics", "economy"])
        ]

    grpc_client = tc.InferenceServerClient(address)
    text = tc.InferInput("text", [len(TEXTS)], "BYTES")
    text.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=object))
    logits = grpc_client.infer("cls", [text]).as_numpy("logits")
    encoder = pipeline(task_packages["cls"]).encoder
    batch = encoder.pad(encoder.tokenize(TEXTS))
    tokens = []
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        tensor = tc.InferInput(name, list(batch.feeds[name].shape), "INT64")
        tensor.set_data_from_numpy(batch.feeds[name])
        tokens.append(tensor)
    assert np.allclose(grpc_client.infer("cls", tokens).as_numpy("logits"), logits, atol=1e-6)

    http_client = th.InferenceServerClient(served.http.removeprefix("http://"))
    rest = th.InferInput("text", [len(TEXTS)], "BYTES")
    rest.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=object))
    assert np.array_equal(http_client.infer("cls", [rest]).as_numpy("logits"), logits)


def test_errors_keep_their_status_across_the_process_boundary(served):
    with KilnClient(served.address) as client:
        for call, code in [
            (lambda: client.classify("nope", TEXTS), grpc.StatusCode.NOT_FOUND),
            (lambda: client.classify("cls", [""]), grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: client.classify("ner", TEXTS), grpc.StatusCode.INVALID_ARGUMENT),
        ]:
            with pytest.raises(grpc.RpcError) as failure:
                call()
            assert failure.value.code() == code, failure.value.details()


def test_statistics_and_metrics_count_every_frontend_once(served):
    import tritonclient.grpc as tc

    stats = lambda: tc.InferenceServerClient(served.address).get_inference_statistics("cls").model_stats[0]  # noqa: E731
    before, ok_before = stats(), metric(served.metrics_url, "kiln_requests_total", model="cls", code="OK")
    calls = 12
    results = [_classify_once(served.address) for _ in range(calls)]  # a connection each: both front-ends
    assert results == ["OK"] * calls
    after = stats()
    assert after.inference_stats.success.count - before.inference_stats.success.count == calls
    assert after.inference_count - before.inference_count == calls
    assert after.execution_count > before.execution_count  # the engine's batches, on the same page
    ok_after = metric(served.metrics_url, "kiln_requests_total", model="cls", code="OK")
    assert ok_after - ok_before == calls  # every front-end's requests, on the supervisor's one page
    assert metric(served.metrics_url, "kiln_batch_size_count", model="cls") > 0  # the engine's, summed in


def test_a_frontend_killed_is_restarted_and_the_others_serve_meanwhile(served):
    [victim, _] = _children(served.process.pid, "kiln-frontend")
    os.kill(victim, signal.SIGKILL)
    _wait_for(lambda: victim not in _children(served.process.pid, "kiln-frontend"))
    # once it is gone, calls land on the live front-end: none fails for the dead one, not even one whose
    # channel reuses a connection the victim held (gRPC shares connections between channels): the reset
    # puts it in reconnect back-off, which KilnClient keeps shorter than its retries (this failed 3 in 7)
    assert [_classify_once(served.address) for _ in range(6)] == ["OK"] * 6
    _wait_for(lambda: len(_children(served.process.pid, "kiln-frontend")) == 2)
    assert victim not in _children(served.process.pid, "kiln-frontend")


def test_an_engine_killed_fails_calls_at_once_then_serves_again(served):
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(served.address)
    [engine] = _children(served.process.pid, "kiln-engine")
    held = {}

    def long_call() -> None:  # a call the engine holds when it dies (grpc.aio, no client retry)
        started = time.monotonic()
        [held["code"]] = burst(served.address, "Classify", [kiln_pb2.ClassifyRequest(model="cls", texts=["x"])], 30)
        held["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=long_call)
    os.kill(engine, signal.SIGSTOP)  # the call reaches the engine and waits there
    thread.start()
    time.sleep(0.5)
    os.kill(engine, signal.SIGKILL)
    thread.join(30)
    assert held["code"] == "UNAVAILABLE" and held["seconds"] < 5  # failed at once, retryable; no hang
    _wait_for(lambda: _children(served.process.pid, "kiln-engine") not in ([], [engine]))
    _wait_for(lambda: client.is_server_ready() and _classify_once(served.address) == "OK")


def test_sigterm_under_load_loses_nothing(task_packages):
    with running_server("--frontends", "2", "--drain-seconds", "0.5", models={"cls": task_packages["cls"]}) as running:
        _wait_for(lambda: len(_children(running.process.pid, "kiln-frontend")) == 2)
        requests = [kiln_pb2.ClassifyRequest(model="cls", texts=[f"text number {i}"] * 4) for i in range(64)]
        results: list[str] = []
        sender = threading.Thread(target=lambda: results.extend(burst(running.address, "Classify", requests, 30)))
        sender.start()
        time.sleep(0.05)
        running.process.send_signal(signal.SIGTERM)
        sender.join(60)
        assert running.process.wait(60) == 0
    # answered, or refused before running with a status a client retries elsewhere: never lost
    assert len(results) == 64 and set(results) <= {"OK", "UNAVAILABLE"}, results
    assert "OK" in results


def test_what_cannot_start_ends_the_server_with_an_error(task_packages, tmp_path):
    """Options the single process refuses are refused before any child starts; a package the engine
    cannot load ends the server with exit code 1 (not an engine restarted for ever)."""
    broken = tmp_path / "broken"
    shutil.copytree(task_packages["cls"], broken)
    (broken / "model.onnx").write_bytes(b"not an onnx graph")
    cases = [
        ([str(tmp_path / "missing-repository")], ["--model-repository"], "is not a directory"),
        ([str(task_packages["cls"]), str(task_packages["emb"])], ["--name", "a", "--name", "a"], "two packages"),
        ([str(task_packages["cls"])], ["--frontends", "-1"], "argument --frontends: must be 0 or more"),
        ([str(broken)], [], "engine could not start"),
    ]
    for packages, flags, message in cases:
        if flags == ["--model-repository"]:
            packages, flags = [], ["--model-repository", packages[0]]
        command = [sys.executable, "-m", "kiln.runtime.cli", "serve", *packages, *flags, "--grpc-port", "0"]
        command += [] if "--frontends" in flags else ["--frontends", "2"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and message in done.stderr, done.stderr[-3000:]


def test_children_stop_when_the_supervisor_is_killed(task_packages):
    with running_server("--frontends", "1", models={"cls": task_packages["cls"]}) as running:
        _wait_for(lambda: len(_children(running.process.pid, "kiln-")) == 2)
        children = _children(running.process.pid, "kiln-")
        running.process.kill()
        running.process.wait(10)

        def alive(pid: int) -> bool:
            try:
                return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
            except OSError:
                return False

        _wait_for(lambda: not any(alive(pid) for pid in children), timeout=60)  # none left orphaned
