"""Corpus loading and the summary figures every bench reports."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROUNDS = 4  # engines compared side by side take turns this many times (see bench/README.md)


def free_port() -> int:
    """A free loopback port for a server the bench starts."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_corpus(path: Path, limit: int | None = None) -> list[str]:
    texts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if len(line.strip()) > 3]
    if not texts:
        raise SystemExit(f"corpus {path} has no usable lines")
    return texts[:limit] if limit else texts


@dataclass
class Timing:
    """Latency percentiles (ms) and throughput of one engine at one setting."""

    name: str
    setting: str
    p50_ms: float
    p90_ms: float
    p99_ms: float
    texts_per_s: float
    tokens_per_s: float
    calls: int
    errors: int = 0

    @classmethod
    def of(
        cls, name: str, setting: str, latencies: list[float], wall: float, texts: int, tokens: int, errors: int = 0
    ) -> Timing:
        ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
        return cls(
            name,
            setting,
            float(np.percentile(ms, 50)),
            float(np.percentile(ms, 90)),
            float(np.percentile(ms, 99)),
            texts / wall,
            tokens / wall,
            len(latencies),
            errors,
        )

    def row(self) -> dict:
        return asdict(self)


def fifo_sojourns(service: np.ndarray, rate: float, servers: int, arrivals: int = 100_000, seed: int = 0) -> np.ndarray:
    """Seconds from arrival to completion in an ideal first-come-first-served queue: Poisson arrivals
    at `rate`, `servers` working in parallel, service times drawn from `service`, no overhead at all.
    The floor any server on those cores could reach at that load."""
    rng = np.random.default_rng(seed)
    arrived = np.cumsum(rng.exponential(1 / rate, arrivals))
    needed = rng.choice(service, arrivals)
    free_at = np.zeros(servers)
    sojourns = np.empty(arrivals)
    for i in range(arrivals):
        k = int(free_at.argmin())
        free_at[k] = max(arrived[i], free_at[k]) + needed[i]
        sojourns[i] = free_at[k] - arrived[i]
    return sojourns
