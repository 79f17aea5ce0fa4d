"""`kiln bench serve`: the real server under load, next to the raw session and optimum, in one run.

The load generator is asyncio gRPC on the typed API, one text per request (the way independent
callers arrive): closed loop at several concurrency levels, then open loop at half the peak rate,
where latency is measured from each request's scheduled send time (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from kiln.bench.stats import Timing
from kiln.runtime import pipeline
from kiln.runtime.manifest import read_manifest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`kiln serve` in a subprocess, on a free loopback port."""

    def __init__(self, package: Path, extra: list[str]):
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        command = [
            sys.executable,
            "-m",
            "kiln.runtime.cli",
            "serve",
            str(package),
            "--name",
            "bench",
            "--port",
            str(self.port),
            *extra,
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"kiln serve exited: {self.process.stderr.read()}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.1)
        raise SystemExit("kiln serve did not start")

    def __exit__(self, *exc: object) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=60)


def _request(task: str, text: str) -> tuple[str, Any]:
    from kiln.proto import kiln_pb2 as pb

    if task == "text-classification":
        return "Classify", pb.ClassifyRequest(model="bench", texts=[text])
    return "Embed", pb.EmbedRequest(model="bench", texts=[text])


async def _closed_loop(address: str, task: str, texts: list[str], concurrency: int, requests: int) -> tuple:
    import grpc
    from kiln.proto import kiln_pb2_grpc

    latencies: list[float] = []
    errors = 0
    queue = iter(range(requests))
    async with grpc.aio.insecure_channel(address) as channel:
        stub = kiln_pb2_grpc.KilnStub(channel)

        async def worker() -> None:
            nonlocal errors
            for index in queue:
                method, request = _request(task, texts[index % len(texts)])
                start = time.perf_counter()
                try:
                    await getattr(stub, method)(request, timeout=60)
                    latencies.append(time.perf_counter() - start)
                except grpc.RpcError:
                    errors += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return latencies, time.perf_counter() - start, errors


async def _open_loop(address: str, task: str, texts: list[str], rate: float, seconds: float) -> tuple:
    import grpc
    from kiln.proto import kiln_pb2_grpc

    latencies: list[float] = []
    errors = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = kiln_pb2_grpc.KilnStub(channel)
        rng = random.Random(0)

        async def one(index: int, scheduled: float) -> None:
            nonlocal errors
            method, request = _request(task, texts[index % len(texts)])
            try:
                await getattr(stub, method)(request, timeout=60)
                latencies.append(time.perf_counter() - scheduled)
            except grpc.RpcError:
                errors += 1

        tasks, start, at, index = [], time.perf_counter(), 0.0, 0
        while at < seconds:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            tasks.append(asyncio.create_task(one(index, start + at)))
            index += 1
            at += rng.expovariate(rate)  # Poisson arrivals
        await asyncio.gather(*tasks)
        return latencies, time.perf_counter() - start, errors


def raw_session(package: Path, texts: list[str], batch: int, sort: bool) -> tuple[list[float], float]:
    """The bare onnxruntime session with tokenization and padding (no pipeline, no server)."""
    pkg = pipeline(package).package
    lengths = [len(e.ids) for e in pkg.encoder.encode(texts)]
    order = sorted(range(len(texts)), key=lengths.__getitem__) if sort else list(range(len(texts)))
    groups = [[texts[i] for i in order[s : s + batch]] for s in range(0, len(order), batch)]
    pkg.run(pkg.encoder.pad(pkg.encoder.encode(groups[0])))
    latencies, start = [], time.perf_counter()
    for group in groups:
        t = time.perf_counter()
        pkg.run(pkg.encoder.pad(pkg.encoder.encode(group)))
        latencies.append(time.perf_counter() - t)
    return latencies, time.perf_counter() - start


def optimum_pipeline(package: Path, texts: list[str], batch: int) -> tuple[list[float], float] | None:
    """optimum's ORTModel in a transformers pipeline at a static batch size (its usual deployment)."""
    try:
        from optimum.onnxruntime import ORTModelForFeatureExtraction, ORTModelForSequenceClassification
        from transformers import AutoTokenizer
        from transformers import pipeline as hf_pipeline
    except ImportError:
        return None
    task = read_manifest(package).task
    cls = ORTModelForSequenceClassification if task == "text-classification" else ORTModelForFeatureExtraction
    model = cls.from_pretrained(package, file_name="model.onnx")
    pipe = hf_pipeline(task, model=model, tokenizer=AutoTokenizer.from_pretrained(package), device="cpu")
    groups = [texts[s : s + batch] for s in range(0, len(texts), batch)]
    pipe(groups[0], batch_size=batch, truncation=True)
    latencies, start = [], time.perf_counter()
    for group in groups:
        t = time.perf_counter()
        pipe(group, batch_size=batch, truncation=True)
        latencies.append(time.perf_counter() - t)
    return latencies, time.perf_counter() - start


def bench_serve(
    package: Path, texts: list[str], concurrency: list[int], requests: int, server_args: list[str], progress: Any
) -> dict[str, Any]:
    task = read_manifest(package).task
    tokens_per_text = np.mean([len(e.ids) for e in pipeline(package).encoder.encode(texts)])
    timings = []

    def add(name: str, setting: str, latencies: list[float], wall: float, n: int, errors: int = 0) -> Timing:
        timing = Timing.of(name, setting, latencies, wall, n, int(n * tokens_per_text), errors)
        timings.append(timing.row())
        return timing

    progress("serve: raw session, one text at a time")
    lat, wall = raw_session(package, texts, 1, sort=False)
    raw_one = add("raw session", "one at a time", lat, wall, len(texts))
    progress("serve: raw session, length-sorted batches of 32")
    lat, wall = raw_session(package, texts, 32, sort=True)
    add("raw session", "sorted batches of 32", lat, wall, len(texts))
    progress("serve: optimum ORTModel pipeline, batch 32")
    result = optimum_pipeline(package, texts, 32)
    optimum = add("optimum pipeline", "batch 32", *result, len(texts)) if result else None

    closed = []
    with Server(package, server_args) as server:
        asyncio.run(_closed_loop(server.address, task, texts, 4, 20))  # warm-up
        for level in concurrency:
            progress(f"serve: kiln serve, {level} concurrent clients")
            n = max(requests, 4 * level)
            lat, wall, errors = asyncio.run(_closed_loop(server.address, task, texts, level, n))
            closed.append(add("kiln serve", f"{level} clients", lat, wall, len(lat), errors))
        peak = max(closed, key=lambda t: t.texts_per_s)
        rate = peak.texts_per_s / 2
        progress(f"serve: kiln serve, open loop at {rate:.1f} req/s (half of peak)")
        lat, wall, errors = asyncio.run(_open_loop(server.address, task, texts, rate, 20.0))
        half = add("kiln serve", f"open loop {rate:.1f}/s", lat, wall, len(lat), errors)
    single = closed[0] if concurrency[0] == 1 else None
    top = next((t for t in closed if t.setting == f"{max(concurrency)} clients"), closed[-1])
    checks = {
        "single_request_overhead_ms": single.p50_ms - raw_one.p50_ms if single else None,
        "serve_vs_raw_one_at_a_time": top.texts_per_s / raw_one.texts_per_s,
        "serve_vs_optimum_batch32": top.texts_per_s / optimum.texts_per_s if optimum else None,
        "p99_half_peak_vs_single_p50": half.p99_ms / single.p50_ms if single else None,
        "latencies_ms": {"half_peak": [x * 1000 for x in lat]},
    }
    return {"task": task, "texts": len(texts), "timings": timings, "checks": checks}
