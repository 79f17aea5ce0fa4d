"""A small Python client for the typed kiln.v1 API.

from kiln.runtime.client import KilnClient
with KilnClient("127.0.0.1:8001") as client:
    client.classify("ynat", ["삼성전자 3분기 영업이익 급증"])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from kiln.proto import kiln_pb2 as pb
from kiln.proto import kiln_pb2_grpc as pb_grpc


class KilnClient:
    def __init__(
        self,
        address: str = "127.0.0.1:8001",
        token: str | None = None,
        tls_ca: Path | None = None,
        timeout: float | None = 30.0,
    ):
        if tls_ca is not None:
            self._channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(Path(tls_ca).read_bytes()))
        else:
            self._channel = grpc.insecure_channel(address)
        self._stub = pb_grpc.KilnStub(self._channel)
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
