"""The server's logs: tracebacks in both formats, an opt-in access line per request, and request
ids that travel from the caller to the log and back (HTTP X-Request-ID, gRPC x-request-id)."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request

import grpc
import pytest
from kiln.proto import grpc_service_pb2 as pb
from kiln.proto import grpc_service_pb2_grpc as pb_grpc
from kiln.runtime.serve.logs import configure_logging
from servers import running_server


@pytest.mark.parametrize("structured", [False, True])
def test_a_logged_exception_keeps_its_traceback(structured, capsys):
    configure_logging(structured)
    try:
        raise ZeroDivisionError("the cause")
    except ZeroDivisionError:
        logging.getLogger("kiln.serve").exception("request %s failed", "r1", extra={"fields": {"model": "cls"}})
    line = capsys.readouterr().err
    if structured:
        record = json.loads(line)
        assert record["msg"] == "request r1 failed" and record["model"] == "cls" and record["level"] == "error"
        assert "Traceback" in record["exception"] and "ZeroDivisionError: the cause" in record["exception"]
    else:
        assert "request r1 failed model=cls" in line and "ZeroDivisionError: the cause" in line


def test_debug_lines_only_when_verbose(capsys):
    for verbose in (0, 1):
        configure_logging(False, verbose)
        logging.getLogger("kiln.serve").debug("detail")
    assert capsys.readouterr().err.count("detail") == 1


def _post(url: str, body: dict, headers: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, dict(reply.headers)
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers)


def test_access_log_and_request_ids_from_the_caller_and_back(task_packages):
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["Great service."]}]}
    flags = ("--access-log", "--log-format", "json")
    with running_server(*flags, models={"cls": task_packages["cls"]}) as server:
        url = f"{server.http}/v2/models/cls/infer"
        status, headers = _post(url, body, {"X-Request-ID": "caller-id-1"})
        assert status == 200 and headers["X-Request-ID"] == "caller-id-1"
        status, headers = _post(url, {"inputs": []}, {"X-Request-ID": "caller-id-2"})
        assert status == 400 and headers["X-Request-ID"] == "caller-id-2"  # refused, still echoed
        status, headers = _post(url, body, {})
        assert status == 200 and len(headers["X-Request-ID"]) == 32  # kiln's own, when the caller gives none
        status, headers = _post(url, {**body, "id": "kserve-id-4"}, {})
        assert status == 200 and headers["X-Request-ID"] == "kserve-id-4"  # else the KServe request's id
        request = pb.ModelInferRequest(model_name="cls")
        request.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"Great.")
        with grpc.insecure_channel(server.address) as channel:
            _, call = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer.with_call(
                request, metadata=[("x-request-id", "caller-id-3")], timeout=30
            )
        assert ("x-request-id", "caller-id-3") in call.trailing_metadata()
    lines = [json.loads(line) for line in server.process.stderr.read().splitlines() if line.startswith("{")]
    access = {line["request_id"]: line for line in lines if line["msg"] == "request"}
    assert access["caller-id-1"]["code"] == "OK" and access["caller-id-1"]["api"] == "kserve-http"
    assert access["caller-id-2"]["code"] == "INVALID_ARGUMENT" and access["caller-id-2"]["model"] == "cls"
    assert access["caller-id-3"]["api"] == "kserve" and access["caller-id-3"]["ms"] > 0
    assert access["kserve-id-4"]["code"] == "OK" and len(access) == 5


def test_no_access_log_unless_asked(task_packages):
    with running_server(models={"cls": task_packages["cls"]}) as server:
        _post(f"{server.http}/v2/models/cls/infer", {"inputs": []}, {})
    assert " kiln request " not in server.process.stderr.read()
