"""`kiln bench serve --url HOST:PORT --model NAME`: a server that is already running — a
deployment, or any KServe v2 server with a text input, Triton included — measured as Triton's
perf_analyzer measures one: a concurrency sweep (closed loop), then open-loop request rates, with
p50/p90/p99 and throughput, through the clients users run (kiln.bench.clients)."""

from __future__ import annotations

from typing import Any

from kiln.bench.clients import PROTOCOLS, closed_loop, discover, open_loop, run_sync
from kiln.bench.stats import Timing

PROTOCOL_NAMES = {"kserve-grpc": "KServe gRPC", "kserve-http": "KServe REST", "typed": "kiln.v1"}


def bench_remote(
    url: str,
    http: str | None,
    model: str,
    texts: list[str],
    concurrency: list[int],
    requests: int,
    rates: list[float],
    seconds: float,
    progress: Any,
) -> dict[str, Any]:
    target = discover(url, http, model)
    protocols = ["kserve-grpc"] + (["kserve-http"] if http else [])
    timings = []
    for protocol in protocols:
        client = PROTOCOLS[protocol]
        run_sync(closed_loop(client(target), texts, max(concurrency), 2 * max(concurrency)))  # warm-up
        peak = 0.0
        for level in concurrency:
            progress(f"remote: {PROTOCOL_NAMES[protocol]}, {level} concurrent clients")
            run = run_sync(closed_loop(client(target), texts, level, max(requests, 4 * level)))
            timing = Timing.of(f"{model}, {PROTOCOL_NAMES[protocol]}", f"{level} clients", run.latencies, run.wall,
                               len(run.latencies), 0, run.errors)  # fmt: skip
            timings.append(timing.row())
            peak = max(peak, timing.texts_per_s)
        for rate in rates or [peak / 2, peak * 0.8]:
            progress(f"remote: {PROTOCOL_NAMES[protocol]}, open loop at {rate:.1f} requests/s")
            run = run_sync(open_loop(client(target), texts, rate, seconds))
            timing = Timing.of(f"{model}, {PROTOCOL_NAMES[protocol]}", f"open loop {rate:.1f}/s", run.latencies,
                               run.wall, len(run.latencies), 0, run.errors)  # fmt: skip
            timings.append(timing.row())
    return {"task": f"{target.task} at {url}", "texts": len(texts), "timings": timings, "checks": {}}


def remote_steps(concurrency: list[int], rates: list[float], http: bool) -> int:
    return (1 + int(http)) * (len(concurrency) + (len(rates) or 2))
