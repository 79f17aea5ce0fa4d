"""A small Python client for kiln serve: the typed kiln.v1 API, and KServe v2 inference with text
inputs (any KServe v2 server, Triton included). Usable beside tritonclient in one process.

from kiln.runtime.client import KilnClient
with KilnClient("127.0.0.1:8001") as client:
    client.classify("ynat", ["삼성전자 3분기 영업이익 급증"])
    client.infer("ynat", {"text": ["삼성전자 3분기 영업이익 급증"]})  # {"label": [...], "score": [...], ...}
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf.json_format import MessageToDict
from kiln.proto import grpc_service_pb2 as kserve
from kiln.proto import grpc_service_pb2_grpc as kserve_grpc
from kiln.proto import kiln_pb2 as pb
from kiln.proto import kiln_pb2_grpc as pb_grpc
from kiln.runtime.wire import DTYPES, unpack_bytes

# Spread calls over every replica an address resolves to, stop sending to a replica as soon as its
# health says it is draining, and retry a call only when a replica refused it (UNAVAILABLE), never
# one it accepted: kiln answers a draining refusal before doing any work, so a retry cannot run a
# request twice.
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    # watch each replica's grpc.health.v1 status: one that starts draining (NOT_SERVING) gets no new calls
    "healthCheckConfig": {"serviceName": ""},
    "methodConfig": [
        {
            "name": [{"service": "kiln.v1.Kiln"}, {"service": "inference.GRPCInferenceService"}],
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.05s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}

# A connection reset (a replica killed) puts it in back-off before the next connect: gRPC's default
# first wait is 1 s, longer than the retries above wait in all (0.75 s), so the retries would all
# fail on a live server. Reconnect after 0.1 s: the new connection lands on a replica that lives.
RECONNECT = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100)]


def channel_target(address: str | list[str]) -> str:
    """One gRPC target for one address (a `dns:///` name resolves to every replica behind a headless
    Service) or for several `ip:port` replicas."""
    if isinstance(address, str):
        return address
    if len(address) == 1:
        return address[0]
    hosts = [a.rsplit(":", 1)[0].strip("[]") for a in address]
    try:
        families = {ipaddress.ip_address(h).version for h in hosts}
    except ValueError as exc:
        raise ValueError(
            "several addresses must be ip:port; for host names give one dns:///name:port that resolves to every replica"
        ) from exc
    if len(families) != 1:
        raise ValueError("several addresses must be all IPv4 or all IPv6")
    return f"ipv{families.pop()}:" + ",".join(address)


class KilnClient:
    def __init__(
        self,
        address: str | list[str] = "127.0.0.1:8001",
        token: str | None = None,
        tls_ca: Path | None = None,
        timeout: float | None = 30.0,
    ):
        target = channel_target(address)
        options = [("grpc.service_config", json.dumps(SERVICE_CONFIG)), ("grpc.enable_retries", 1), *RECONNECT]
        if tls_ca is not None:
            credentials = grpc.ssl_channel_credentials(Path(tls_ca).read_bytes())
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.KilnStub(self._channel)
        self._kserve = kserve_grpc.GRPCInferenceServiceStub(self._channel)
        self._metadata = [("authorization", f"Bearer {token}")] if token else []
        self.timeout = timeout

    def __enter__(self) -> KilnClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, rpc: str, request: Any) -> Any:
        return getattr(self._stub, rpc)(request, metadata=self._metadata, timeout=self.timeout)

    def task_of(self, model: str) -> str:
        """The task a served model does (from its KServe model configuration)."""
        request = kserve.ModelConfigRequest(name=model)
        config = self._kserve.ModelConfig(request, metadata=self._metadata, timeout=self.timeout).config
        return config.parameters["task"].string_value

    def infer(self, model: str, texts: dict[str, list[str]], parameters: dict[str, Any] | None = None) -> dict:
        """KServe v2 ModelInfer with BYTES text inputs; outputs as lists (JSON outputs parsed)."""
        request = kserve.ModelInferRequest(model_name=model)
        for name, values in texts.items():
            tensor = request.inputs.add(name=name, datatype="BYTES", shape=[len(values)])
            tensor.contents.bytes_contents.extend(v.encode("utf-8") for v in values)
        for name, value in (parameters or {}).items():
            _set_parameter(request.parameters[name], value)
        response = self._kserve.ModelInfer(request, metadata=self._metadata, timeout=self.timeout)
        return {
            o.name: _decode_output(o, raw)
            for o, raw in zip(response.outputs, response.raw_output_contents, strict=True)
        }

    def models(self) -> list[dict[str, Any]]:
        return [_dict(m) for m in self._call("ListModels", pb.ListModelsRequest()).models]

    def model(self, name: str) -> dict[str, Any]:
        return _dict(self._call("GetModel", pb.GetModelRequest(model=name)))

    def classify(
        self,
        model: str,
        texts: list[str],
        text_pairs: list[str] | None = None,
        top_k: int = 1,
        function_to_apply: str = "",
    ) -> list[dict[str, Any]]:
        request = pb.ClassifyRequest(
            model=model, texts=texts, text_pairs=text_pairs or [], top_k=top_k, function_to_apply=function_to_apply
        )
        return [_dict(r) for r in self._call("Classify", request).results]

    def tag(self, model: str, texts: list[str], aggregation_strategy: str = "none") -> list[list[dict[str, Any]]]:
        response = self._call(
            "TagTokens", pb.TagTokensRequest(model=model, texts=texts, aggregation_strategy=aggregation_strategy)
        )
        return [[_dict(e) for e in r.entities] for r in response.results]

    def answer(
        self, model: str, questions: list[str], contexts: list[str], top_k: int = 1, **options: Any
    ) -> list[list[dict[str, Any]]]:
        request = pb.AnswerRequest(model=model, questions=questions, contexts=contexts, top_k=top_k, **options)
        return [[_dict(a) for a in r.answers] for r in self._call("Answer", request).results]

    def embed(
        self, model: str, texts: list[str], pooling: str = "", normalize: bool | None = None
    ) -> list[list[float]]:
        request = pb.EmbedRequest(model=model, texts=texts, pooling=pooling)
        if normalize is not None:
            request.normalize = normalize
        return [list(e.values) for e in self._call("Embed", request).embeddings]

    def fill_mask(
        self, model: str, texts: list[str], top_k: int = 5, targets: list[str] | None = None
    ) -> list[list[list[dict[str, Any]]]]:
        request = pb.FillMaskRequest(model=model, texts=texts, top_k=top_k, targets=targets or [])
        return [[[_dict(f) for f in mask.fills] for mask in r.masks] for r in self._call("FillMask", request).results]

    def zero_shot(
        self,
        model: str,
        texts: list[str],
        candidate_labels: list[str],
        multi_label: bool = False,
        hypothesis_template: str = "",
    ) -> list[dict[str, Any]]:
        request = pb.ZeroShotRequest(
            model=model,
            texts=texts,
            candidate_labels=candidate_labels,
            multi_label=multi_label,
            hypothesis_template=hypothesis_template,
        )
        return [_dict(r) for r in self._call("ZeroShot", request).results]


def _dict(message: Any) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _set_parameter(parameter: Any, value: Any) -> None:
    if isinstance(value, bool):
        parameter.bool_param = value
    elif isinstance(value, int):
        parameter.int64_param = value
    elif isinstance(value, float):
        parameter.double_param = value
    else:
        parameter.string_param = value if isinstance(value, str) else json.dumps(value)


def _decode_output(tensor: Any, raw: bytes) -> list[Any]:
    if tensor.datatype != "BYTES":
        return np.frombuffer(raw, dtype=DTYPES[tensor.datatype]).reshape(list(tensor.shape)).tolist()
    values = []
    for element in unpack_bytes(raw, tensor.name):
        text = element.decode("utf-8")
        try:
            values.append(json.loads(text) if text[:1] in "[{" else text)
        except json.JSONDecodeError:
            values.append(text)
    return values
