"""OpenTelemetry: with --trace-endpoint, a request's spans reach an OTLP/HTTP collector (one runs in
this test), under the caller's W3C traceparent, with a child span per stage the request went through."""

from __future__ import annotations

import json
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
from kiln.proto import grpc_service_pb2 as pb
from kiln.proto import grpc_service_pb2_grpc as pb_grpc
from servers import running_server

trace_service = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2")

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
GRPC_TRACE_ID = "5bf92f3577b34da6a3ce929d0e0e4737"
STAGES = ("tokenize", "queue", "infer", "postprocess")
PARENT = "00f067aa0ba902b7"


class Collector(ThreadingHTTPServer):
    """An OTLP/HTTP collector that keeps the spans it is sent: (name, trace id, parent span id)."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Receive)
        self.spans: list[tuple[str, str, str]] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Receive(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = trace_service.ExportTraceServiceRequest.FromString(body)
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                for span in scope.spans:
                    self.server.spans.append((span.name, span.trace_id.hex(), span.parent_span_id.hex()))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()
        self.wfile.write(trace_service.ExportTraceServiceResponse().SerializeToString())

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def collector():
    server = Collector()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def test_traced_requests_reach_the_collector_with_their_stages(task_packages, collector):
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["Great service."]}]}
    with running_server("--trace-endpoint", collector.endpoint, models={"cls": task_packages["cls"]}) as server:
        request = urllib.request.Request(
            f"{server.http}/v2/models/cls/infer",
            json.dumps(body).encode(),
            {"Content-Type": "application/json", "traceparent": f"00-{TRACE_ID}-{PARENT}-01"},
        )
        assert urllib.request.urlopen(request, timeout=30).status == 200
        grpc_request = pb.ModelInferRequest(model_name="cls")
        grpc_request.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"Great.")
        with grpc.insecure_channel(server.address) as channel:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                grpc_request, metadata=[("traceparent", f"00-{GRPC_TRACE_ID}-{PARENT}-01")], timeout=30
            )
    # the server has stopped: its last spans were sent before it exited
    for trace_id in (TRACE_ID, GRPC_TRACE_ID):
        ours = [span for span in collector.spans if span[1] == trace_id]
        assert set(STAGES) <= {name for name, _, _ in ours}, collector.spans
        server_span = [parent for name, _, parent in ours if name not in STAGES]
        assert server_span == [PARENT]  # the server span continues the caller's trace


def test_tracing_off_imports_nothing_of_opentelemetry():
    """Off by default, and then free: serving loads no OpenTelemetry module."""
    import subprocess
    import sys

    probe = (
        "import sys, kiln.runtime.cli, kiln.runtime.serve.server; print(any('opentelemetry' in m for m in sys.modules))"
    )
    assert (
        subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )
