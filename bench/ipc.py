"""How front-end processes should talk to the engine process: candidate transports measured side by
side, with the message a short request really sends (a row of ~40 token ids and its type ids out, a
row of logits back).

For each transport: the round-trip p50/p99 of one message in flight (a lone request's cost), and
messages per second with 64 in flight from one client (a loaded front-end), the engine echoing
each request with a reply of the reply's size. Transports run in alternating rounds in one process
tree, so drift spreads over all of them.

    python -m kiln.bench.ipc [--rounds 3] [--messages 20000]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import pickle
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import zmq

IDS = list(range(101, 141))  # a short text's 40 token ids
LOGITS = np.linspace(-3, 3, 7, dtype=np.float32)  # one row of a 7-label classifier's logits


class Request(msgspec.Struct, array_like=True):
    id: int
    model: str
    deadline: float
    ids: bytes  # int64 ids, raw
    type_ids: bytes


class Reply(msgspec.Struct, array_like=True):
    id: int
    name: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes


def _request(index: int) -> Request:
    ids = np.asarray(IDS, dtype=np.int64)
    return Request(index, "tiny", 0.0, ids.tobytes(), np.zeros_like(ids).tobytes())


def _reply(request: Request) -> Reply:
    return Reply(request.id, "logits", "float32", LOGITS.shape, LOGITS.tobytes())


# ---- codecs ---------------------------------------------------------------------------------------

CODECS: dict[str, tuple[Callable[[Any], bytes], Callable[[bytes, type], Any]]] = {
    "msgspec": (msgspec.msgpack.Encoder().encode, lambda data, kind: msgspec.msgpack.decode(data, type=kind)),
    "pickle": (lambda obj: pickle.dumps(obj, protocol=5), lambda data, kind: pickle.loads(data)),
}


# ---- the engine side ----------------------------------------------------------------------------


def _zmq_engine(address: str, codec: str) -> None:
    encode, decode = CODECS[codec]
    context = zmq.Context()
    socket = context.socket(zmq.ROUTER)
    socket.bind(address)
    while True:
        peer, data = socket.recv_multipart(copy=False)
        if bytes(data) == b"stop":
            break
        socket.send_multipart([peer, encode(_reply(decode(data.buffer, Request)))], copy=False)
    socket.close(linger=0)
    context.term()


def _pipe_engine(connection: Any, codec: str) -> None:
    encode, decode = CODECS[codec]
    while True:
        data = connection.recv_bytes()
        if data == b"stop":
            break
        connection.send_bytes(encode(_reply(decode(data, Request))))


# ---- the front-end side -------------------------------------------------------------------------


def _zmq_client(address: str, codec: str) -> tuple[Callable[[Request], None], Callable[[], Reply], Callable]:
    encode, decode = CODECS[codec]
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.connect(address)

    def close() -> None:
        socket.send(b"stop")
        socket.close(linger=1000)
        context.term()

    return (
        (lambda r: socket.send(encode(r), copy=False)),
        (lambda: decode(socket.recv(copy=False).buffer, Reply)),
        close,
    )


def _measure(send: Callable, receive: Callable, messages: int, window: int) -> dict[str, float]:
    """Round trips one at a time, then `messages` with `window` in flight."""
    latencies = []
    for index in range(min(messages // 4, 5000)):
        start = time.perf_counter()
        send(_request(index))
        receive()
        latencies.append(time.perf_counter() - start)
    cpu, start = time.process_time(), time.perf_counter()
    sent = received = 0
    while received < messages:
        while sent < messages and sent - received < window:
            send(_request(sent))
            sent += 1
        receive()
        received += 1
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "p50_us": 1e6 * statistics.median(latencies),
        "p99_us": 1e6 * latencies[int(0.99 * (len(latencies) - 1))],
        "per_s": messages / elapsed,
        "client_cpu_us": 1e6 * (time.process_time() - cpu) / messages,
    }


def run_zmq(codec: str, messages: int, window: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        address = f"ipc://{Path(folder) / 'engine'}"
        engine = mp.get_context("spawn").Process(target=_zmq_engine, args=(address, codec), daemon=True)
        engine.start()
        send, receive, close = _zmq_client(address, codec)
        try:
            return _measure(send, receive, messages, window)
        finally:
            close()
            engine.join(10)


def run_pipe(codec: str, messages: int, window: int) -> dict[str, float]:
    """A Unix socket pair with length-prefixed frames (multiprocessing's Connection): no I/O thread."""
    encode, decode = CODECS[codec]
    ours, theirs = mp.get_context("spawn").Pipe()
    engine = mp.get_context("spawn").Process(target=_pipe_engine, args=(theirs, codec), daemon=True)
    engine.start()
    try:
        send = lambda r: ours.send_bytes(encode(r))  # noqa: E731
        return _measure(send, lambda: decode(ours.recv_bytes(), Reply), messages, window)
    finally:
        ours.send_bytes(b"stop")
        engine.join(10)


TRANSPORTS: dict[str, Callable[[int, int], dict[str, float]]] = {
    "zmq ipc + msgspec msgpack": lambda n, w: run_zmq("msgspec", n, w),
    "zmq ipc + pickle": lambda n, w: run_zmq("pickle", n, w),
    "unix socket pair + msgspec msgpack": lambda n, w: run_pipe("msgspec", n, w),
    "unix socket pair + pickle": lambda n, w: run_pipe("pickle", n, w),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--window", type=int, default=64, help="messages in flight in the throughput phase")
    args = parser.parse_args(argv)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in TRANSPORTS}
    for _ in range(args.rounds):
        for name, run in TRANSPORTS.items():
            results[name].append(run(args.messages, args.window))
    print(f"| transport | round trip p50 (us) | p99 (us) | msgs/s, {args.window} in flight | client CPU us/msg |")
    print("|---|---:|---:|---:|---:|")
    for name, rounds in results.items():

        def span(key: str, fmt: str = ",.0f", rounds: list[dict[str, float]] = rounds) -> str:
            values = sorted(r[key] for r in rounds)
            return f"{values[0]:{fmt}}-{values[-1]:{fmt}}"

        print(f"| {name} | {span('p50_us')} | {span('p99_us')} | {span('per_s')} | {span('client_cpu_us')} |")


if __name__ == "__main__":
    main()
