"""The floor of kiln's own stack: a bare `grpc.aio` server that answers every KServe ModelInfer with
one canned ModelInferResponse (the outputs a text-classification model gives for one text), doing
no work. Whatever a client measures against it is the client, the transport and grpc.aio itself;
kiln's overhead is what it adds on top.

    python -m kiln.bench.floor --port 18101            # serves until interrupted
"""

from __future__ import annotations

import argparse
import asyncio

import grpc
import numpy as np
from kiln.proto import grpc_service_pb2 as pb
from kiln.proto import grpc_service_pb2_grpc as pb_grpc
from kiln.runtime.serve.tensors import write_outputs


def canned_response(model: str = "tiny", labels: int = 4) -> pb.ModelInferResponse:
    """What kiln answers for one text on a classifier: label, score and logits."""
    response = pb.ModelInferResponse(model_name=model, model_version="1")
    outputs = {
        "label": np.array([b"LABEL_0"], dtype=object),
        "score": np.array([0.25], dtype=np.float32),
        "logits": np.zeros((1, labels), dtype=np.float32),
    }
    write_outputs(response, outputs)
    return response


class Floor(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, response: pb.ModelInferResponse):
        self.response = response

    async def ModelInfer(self, request, context):
        return self.response

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)


async def serve(port: int, host: str = "127.0.0.1") -> None:
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Floor(canned_response()), server)
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=18101)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.host))


if __name__ == "__main__":
    main()
