"""`kiln bench serve`: the real server under load through the clients users run, next to the raw
session and optimum, in one run.

One text per request (the way independent callers arrive), through each protocol's own client
(kiln.bench.clients): KServe v2 gRPC via tritonclient, KServe v2 REST via an HTTP client, and
kiln.v1. The headline comparisons take turns in alternating rounds; then the typed API at the other
concurrency levels, and an open loop at half the peak rate (latency from each request's due time,
no coordinated omission). With a GPU provider the raw session is also run in batches the size of
the top concurrency, in corpus order: what a server at best turns that many callers into.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from kiln.bench.clients import PROTOCOLS, KilnTyped, Run, Target, closed_loop, open_loop, run_sync
from kiln.bench.stats import ROUNDS, Timing, fifo_sojourns, free_port
from kiln.runtime.manifest import read_manifest
from kiln.runtime.package import load_package
from kiln.runtime.session import SessionOptions, cpu_count

OPTIMUM_BATCH = 32
NAMES = {
    "typed": "kiln serve, kiln.v1",
    "kserve-grpc": "kiln serve, KServe gRPC",
    "kserve-http": "kiln serve, KServe REST",
}


class Server:
    """`kiln serve` in a subprocess, on free loopback ports (gRPC and HTTP)."""

    def __init__(self, package: Path, extra: list[str]):
        self.grpc_port, self.http_port = free_port(), free_port()
        command = [sys.executable, "-m", "kiln.runtime.cli", "serve", str(package), "--name", "bench"]
        command += ["--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port), "--metrics-port", "0"]
        self.process = subprocess.Popen(
            [*command, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )

    def target(self, task: str) -> Target:
        return Target(f"127.0.0.1:{self.grpc_port}", f"http://127.0.0.1:{self.http_port}", "bench", "text", task)

    def __enter__(self) -> Server:
        import socket

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"kiln serve exited: {self.process.stderr.read()}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.http_port)) == 0:
                    return self
            time.sleep(0.1)
        raise SystemExit("kiln serve did not start")

    def __exit__(self, *exc: object) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=60)


def raw_session(package: Any, texts: list[str], batch: int, sort: bool) -> tuple[list[float], float]:
    """The bare onnxruntime session of a loaded package, with tokenization and padding (no
    pipeline, no server)."""
    if sort:
        lengths = [len(e.ids) for e in package.encoder.tokenize(texts)]
        texts = [texts[i] for i in sorted(range(len(texts)), key=lengths.__getitem__)]

    def run(group: list[str]) -> None:
        package.run(package.encoder.pad(package.encoder.tokenize(group)))

    for start in range(0, len(texts), batch):  # warm-up: every shape this pass will meet
        run(texts[start : start + batch])
    return timed_batches(run, texts, batch)


def optimum_pipeline(package: Path) -> Callable[[list[str]], Any] | None:
    """optimum's ORTModel in a transformers pipeline at batch 32 (its usual deployment), or None
    where optimum is not installed."""
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
    return lambda group: pipe(group, batch_size=OPTIMUM_BATCH, truncation=True)


@dataclass
class Samples:
    """Latencies and busy time of one engine, summed over the rounds it ran in."""

    latencies: list[float] = field(default_factory=list)
    wall: float = 0.0
    texts: int = 0
    errors: int = 0

    def add(self, latencies: list[float], wall: float, texts: int, errors: int = 0) -> None:
        self.latencies += latencies
        self.wall += wall
        self.texts += texts
        self.errors += errors

    def add_run(self, run: Run) -> None:
        self.add(run.latencies, run.wall, len(run.latencies), run.errors)


def timed_batches(run: Callable[[list[str]], Any], texts: list[str], batch: int) -> tuple[list[float], float]:
    latencies, start = [], time.perf_counter()
    for s in range(0, len(texts), batch):
        t = time.perf_counter()
        run(texts[s : s + batch])
        latencies.append(time.perf_counter() - t)
    return latencies, time.perf_counter() - start


def serve_steps(concurrency: list[int]) -> int:
    """Progress stages of bench_serve, for the progress bar."""
    return 2 + ROUNDS + len(_other_levels(concurrency))


def _other_levels(concurrency: list[int]) -> list[int]:
    return [level for level in concurrency if level not in (1, max(concurrency))]


def _paired_rounds(
    target: Target, texts: list[str], engines: dict[str, Any], top: int, requests: int, progress: Any
) -> dict[str, Samples]:
    """The issue's comparisons in alternating rounds, each on a share of the texts: the raw session
    one at a time (on every core, and on one core for the ideal queue), the server with one client
    on the same texts, the server under `top` callers through each protocol's client, optimum."""
    paired = {name: Samples() for name in ("raw", "raw_batched", "one_core", "single", "optimum", *PROTOCOLS)}
    for r in range(ROUNDS):
        chunk = texts[r::ROUNDS]
        progress(f"serve: round {r + 1}/{ROUNDS}: raw session, the server with 1 and {top} callers per protocol")
        paired["raw"].add(*raw_session(engines["raw"], chunk, 1, sort=False), len(chunk))
        if engines["one_core"]:
            paired["one_core"].add(*raw_session(engines["one_core"], chunk, 1, sort=False), len(chunk))
        else:  # a GPU: the raw session at its best, batches of `top` callers' texts
            paired["raw_batched"].add(*raw_session(engines["raw"], texts, top, sort=False), len(texts))
        paired["single"].add_run(run_sync(closed_loop(KilnTyped(target), chunk, 1, len(chunk))))
        for protocol, client in PROTOCOLS.items():
            n = max(requests // ROUNDS, 4 * top)
            paired[protocol].add_run(run_sync(closed_loop(client(target), texts, top, n)))
        if engines["optimum"]:
            paired["optimum"].add(*timed_batches(engines["optimum"], chunk, OPTIMUM_BATCH), len(chunk))
    return paired


def _overhead_ms(single: Samples, raw: Samples) -> float:
    """Median over texts of (server - raw session) on the same text; the p50 difference where a
    failed call broke the pairing."""
    if len(single.latencies) == len(raw.latencies):
        return float(np.median(np.array(single.latencies) - np.array(raw.latencies)) * 1000)
    return float(np.median(single.latencies) - np.median(raw.latencies)) * 1000


def bench_serve(
    package: Path,
    texts: list[str],
    concurrency: list[int],
    requests: int,
    server_args: list[str],
    progress: Any,
    provider: str = "cpu",
) -> dict[str, Any]:
    """kiln serve against the raw session and optimum. The issue's comparisons are measured in
    alternating rounds, so that this machine's drift, often +-30% within minutes, hits every
    engine alike; then the other concurrency levels and the open loop at half the peak."""
    task = read_manifest(package).task
    top = max(concurrency)
    on_cpu = provider == "cpu"
    raw = load_package(package, SessionOptions(provider=provider, max_batch=max(top, 64)))
    if not on_cpu:
        server_args = [*server_args, "--provider", provider]
    tokens_per_text = np.mean([len(e.ids) for e in raw.encoder.tokenize(texts)])
    timings = []

    def add(name: str, setting: str, samples: Samples) -> Timing:
        tokens = int(samples.texts * tokens_per_text)
        timing = Timing.of(name, setting, samples.latencies, samples.wall, samples.texts, tokens, samples.errors)
        timings.append(timing.row())
        return timing

    progress("serve: raw session, length-sorted batches of 32")
    sorted32 = Samples()
    sorted32.add(*raw_session(raw, texts, 32, sort=True), len(texts))
    engines = {
        "raw": raw,
        "one_core": load_package(package, SessionOptions(intra_op_threads=1)) if on_cpu else None,
        "optimum": optimum_pipeline(package) if on_cpu else None,
    }
    with Server(package, server_args) as server:
        target = server.target(task)
        for client in PROTOCOLS.values():  # warm-up, at the top concurrency too: a GPU meets each shape once, slowly
            run_sync(closed_loop(client(target), texts, top, 2 * top))
        if engines["optimum"]:
            engines["optimum"](texts[:OPTIMUM_BATCH])
        paired = _paired_rounds(target, texts, engines, top, requests, progress)
        raw_one = add("raw session", "one at a time", paired["raw"])
        raw_batched = add("raw session", f"batches of {top}", paired["raw_batched"]) if not on_cpu else None
        if on_cpu:
            add("raw session", "one at a time, one core", paired["one_core"])
        add("raw session", "sorted batches of 32", sorted32)
        best = add("optimum pipeline", f"batch {OPTIMUM_BATCH}", paired["optimum"]) if engines["optimum"] else None
        single = add(NAMES["typed"], "1 clients", paired["single"])
        closed = [single]
        for level in _other_levels(concurrency):
            progress(f"serve: kiln.v1, {level} concurrent clients")
            run = run_sync(closed_loop(KilnTyped(target), texts, level, max(requests, 4 * level)))
            closed.append(
                add(
                    NAMES["typed"], f"{level} clients", Samples(run.latencies, run.wall, len(run.latencies), run.errors)
                )
            )
        loaded = {protocol: add(NAMES[protocol], f"{top} clients", paired[protocol]) for protocol in PROTOCOLS}
        closed.append(loaded["typed"])
        rate = max(t.texts_per_s for t in closed) / 2
        progress(f"serve: kiln.v1, open loop at {rate:.1f} req/s (half of peak)")
        run = run_sync(open_loop(KilnTyped(target), texts, rate, 20.0))
        half = add(
            NAMES["typed"], f"open loop {rate:.1f}/s", Samples(run.latencies, run.wall, len(run.latencies), run.errors)
        )
    checks: dict[str, Any] = {"single_request_overhead_ms": _overhead_ms(paired["single"], paired["raw"])}
    for protocol, timing in loaded.items():
        checks[f"{protocol}_vs_raw_one_at_a_time"] = timing.texts_per_s / raw_one.texts_per_s
        if raw_batched:
            checks[f"{protocol}_vs_raw_batched"] = timing.texts_per_s / raw_batched.texts_per_s
    checks["kserve-http_vs_kserve-grpc"] = loaded["kserve-http"].texts_per_s / loaded["kserve-grpc"].texts_per_s
    checks["serve_vs_optimum_batch32"] = loaded["kserve-grpc"].texts_per_s / best.texts_per_s if best else None
    checks["p99_half_peak_vs_single_p50"] = half.p99_ms / single.p50_ms
    checks["p99_half_peak_vs_single_p99"] = half.p99_ms / single.p99_ms
    checks["latencies_ms"] = {"half_peak": [x * 1000 for x in run.latencies]}
    if on_cpu:  # the same arrivals through an ideal queue: one text per core, no overhead of any kind
        sojourns = fifo_sojourns(np.array(paired["one_core"].latencies), rate, cpu_count())
        checks["ideal_p99_at_that_rate_ms"] = ideal_ms = float(np.percentile(sojourns, 99) * 1000)
        checks["ideal_p99_vs_single_p50"] = ideal_ms / single.p50_ms
    return {"task": task, "texts": len(texts), "timings": timings, "checks": checks}
