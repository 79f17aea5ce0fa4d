"""The floor of kiln's own stack: a bare `grpc.aio` server that answers every KServe ModelInfer with
one canned ModelInferResponse (the outputs a text-classification model gives for one text), doing
no work. Whatever a client measures against it is the client, the transport and grpc.aio itself;
kiln's overhead is what it adds on top.

    python -m kiln.bench.floor --port 18101            # serves until interrupted
    python -m kiln.bench.floor --port 18101 --hand-off # each answer comes back from another thread

`--hand-off` sends every request to a thread that hands it back to the loop (a future settled
through `aio.Wakeup`, as kiln's batching thread answers): the least a server that runs its model off
the event loop pays on top of grpc.aio.
"""

from __future__ import annotations

import argparse
import asyncio
import queue
import threading

import grpc
import numpy as np
from kiln.proto import grpc_service_pb2 as pb
from kiln.proto import grpc_service_pb2_grpc as pb_grpc
from kiln.runtime.serve.aio import Wakeup
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
    def __init__(self, response: pb.ModelInferResponse, hand_off: Wakeup | None = None):
        self.response = response
        self.hand_off = hand_off  # the loop's way back, when each request goes to a thread and back
        self._handed: queue.SimpleQueue = queue.SimpleQueue()
        if hand_off is not None:
            threading.Thread(target=self._hand_back, daemon=True).start()

    def _hand_back(self) -> None:
        assert self.hand_off is not None
        while True:
            future = self._handed.get()
            self.hand_off.call(lambda f=future: f.done() or f.set_result(None))

    async def ModelInfer(self, request, context):
        if self.hand_off is not None:
            future = asyncio.get_running_loop().create_future()
            self._handed.put(future)
            await future
        return self.response

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)


async def serve(port: int, host: str = "127.0.0.1", hand_off: bool = False) -> None:
    server = grpc.aio.server()
    floor = Floor(canned_response(), Wakeup(asyncio.get_running_loop()) if hand_off else None)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(floor, server)
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=18101)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--hand-off", action="store_true", help="answer each request from another thread")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.host, args.hand_off))


if __name__ == "__main__":
    main()
