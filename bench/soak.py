"""`kiln bench soak PKG --minutes N --rate R`: steady open-loop load for N minutes, through KServe
gRPC (tritonclient), with the server's resident memory, latency percentiles and errors per window, so
memory growth and lost requests are measured rather than guessed. `--url` soaks a running server
(its memory is then not read)."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
from kiln.bench.clients import KServeGrpc, Target, discover, run_sync
from kiln.runtime.manifest import read_manifest

WINDOW_SECONDS = 30.0  # one row of the table per window


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def _soak(target: Target, texts: list[str], rate: float, seconds: float, pid: int | None, progress: Any) -> list:
    """Requests are counted in the window they were sent in, once every one of them has finished."""
    raw: list[dict[str, Any]] = []
    rng = random.Random(0)
    async with KServeGrpc(target) as send:

        async def one(index: int, due: float, window: dict) -> None:
            try:
                await send(texts[index % len(texts)])
                window["latencies"].append(time.perf_counter() - due)
            except Exception:  # every failure is counted, whatever the client raised
                window["errors"] += 1

        def new_window(end: float) -> dict[str, Any]:
            return {"until_s": end, "latencies": [], "errors": 0, "sent": 0, "rss_mb": None}

        start, at, index, tasks = time.perf_counter(), 0.0, 0, []
        current = new_window(WINDOW_SECONDS)
        while at < seconds:
            if at >= current["until_s"]:
                current["rss_mb"] = rss_mb(pid) if pid else None
                raw.append(current)
                progress(f"soak: {current['until_s']:.0f} s, {current['sent']} sent, server RSS {current['rss_mb']} MB")
                current = new_window(current["until_s"] + WINDOW_SECONDS)
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            current["sent"] += 1
            tasks.append(asyncio.create_task(one(index, start + at, current)))
            index += 1
            at += rng.expovariate(rate)
        await asyncio.gather(*tasks)
        current["rss_mb"] = rss_mb(pid) if pid else None
        raw.append(current)
    return [_close(window) for window in raw]


def _close(window: dict) -> dict[str, Any]:
    ms = np.array(window["latencies"]) * 1000 if window["latencies"] else np.array([np.nan])
    return {
        "until_s": window["until_s"],
        "sent": window["sent"],
        "answered": len(window["latencies"]),
        "errors": window["errors"],
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "rss_mb": window["rss_mb"],
    }


def bench_soak(
    package: Path | None, url: str | None, model: str | None, texts: list[str], rate: float, minutes: float,
    server_args: list[str], progress: Any,
) -> dict[str, Any]:  # fmt: skip
    from kiln.bench.serve import Server

    seconds = minutes * 60
    if url:
        windows = run_sync(_soak(discover(url, None, model or ""), texts, rate, seconds, None, progress))
        return _summary(windows, rate, f"{model} at {url}")
    task = read_manifest(package).task
    with Server(package, server_args) as server:
        windows = run_sync(_soak(server.target(task), texts, rate, seconds, server.process.pid, progress))
    return _summary(windows, rate, str(package))


def _summary(windows: list[dict], rate: float, what: str) -> dict[str, Any]:
    rss = [w["rss_mb"] for w in windows if w["rss_mb"] is not None]
    return {
        "what": what,
        "rate": rate,
        "windows": windows,
        "sent": sum(w["sent"] for w in windows),
        "answered": sum(w["answered"] for w in windows),
        "errors": sum(w["errors"] for w in windows),
        "rss_growth_mb": rss[-1] - rss[0] if len(rss) > 1 else None,
    }


def markdown(soak: dict[str, Any]) -> str:
    lines = [
        f"## soak: {soak['what']}, {soak['rate']:.1f} requests/s",
        "",
        "| until s | sent | answered | errors | p50 ms | p99 ms | server RSS MB |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for w in soak["windows"]:
        rss = "—" if w["rss_mb"] is None else f"{w['rss_mb']:.0f}"
        lines.append(
            f"| {w['until_s']:.0f} | {w['sent']} | {w['answered']} | {w['errors']} | {w['p50_ms']:.1f} "
            f"| {w['p99_ms']:.1f} | {rss} |"
        )
    growth = soak["rss_growth_mb"]
    lines.append(
        f"\n- {soak['answered']} of {soak['sent']} answered, {soak['errors']} errors"
        + ("" if growth is None else f"; server RSS grew {growth:+.1f} MB from the first window to the last")
    )
    return "\n".join(lines) + "\n"
