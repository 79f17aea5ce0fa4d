"""Triton's perf_analyzer against a running server: `kiln bench serve --url HOST:PORT --model NAME
--perf-analyzer` (or the functions here, from a test).

The C++ binary ships inside `tritonclient` 2.41's wheel (the dev install pins it). It links
`libb64.so.0d` (Debian: `apt-get install libb64-0d`) and `libcudart.so.12` even on CPU; the second
comes from the `nvidia-cuda-runtime-cu12` wheel, whose folder is put on LD_LIBRARY_PATH here.

An encoder needs no flags: kiln describes it with Triton's batch convention, so perf_analyzer fills
`text` with random strings. A generator (decoupled, streamed over gRPC) and zero-shot (a label list
per request) need real inputs; `input_data` writes them from the corpus, as genai-perf does.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.bench.clients import discover
from kiln.bench.stats import Timing
from kiln.runtime.tasks import spec_for


@dataclass
class PerfAnalyzerRun:
    """One concurrency level, as perf_analyzer's CSV reports it (latencies in microseconds)."""

    concurrency: int
    per_second: float
    p50_us: float
    p90_us: float
    p99_us: float
    server_queue_us: float
    server_compute_us: float


def binary() -> Path | None:
    found = shutil.which("perf_analyzer") or Path(sys.prefix, "bin", "perf_analyzer")
    return Path(found) if Path(found).exists() else None


def environment() -> dict[str, str]:
    """The process environment with the CUDA runtime's folder on LD_LIBRARY_PATH."""
    env = dict(os.environ)
    try:
        spec = importlib.util.find_spec("nvidia.cuda_runtime")
    except ModuleNotFoundError:  # no nvidia namespace at all
        spec = None
    if spec is not None and spec.submodule_search_locations:
        lib = Path(next(iter(spec.submodule_search_locations)), "lib")
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(lib), env.get("LD_LIBRARY_PATH", "")) if p)
    return env


def unusable() -> str | None:
    """Why perf_analyzer cannot run here, or None when it can."""
    path = binary()
    if path is None:
        return "perf_analyzer not found (it ships in tritonclient==2.41.0's wheel)"
    missing = subprocess.run(["ldd", str(path)], capture_output=True, text=True, env=environment()).stdout
    lost = [line.split()[0] for line in missing.splitlines() if "not found" in line]
    if lost:
        return f"perf_analyzer needs {', '.join(lost)}: apt-get install libb64-0d; pip install nvidia-cuda-runtime-cu12"
    return None


def input_data(
    texts: list[str], inputs: list[str], generator: bool, max_tokens: int = 16, mask_token: str = ""
) -> dict[str, Any]:
    """perf_analyzer's --input-data JSON: one entry per text. A generator's entries ask for
    `max_tokens` tokens, streamed; zero-shot's carry a fixed pair of candidate labels; fill-mask's
    texts end with the model's mask token."""
    entries = []
    for text in texts:
        text = f"{text} {mask_token}" if mask_token else text
        if generator:
            entry = {
                "text_input": {"content": [text], "shape": [1]},
                "max_tokens": {"content": [max_tokens], "shape": [1]},
                "stream": {"content": [True], "shape": [1]},
            }
        else:
            entry = {inputs[0]: {"content": [text], "shape": [1]}}
            if "candidate_labels" in inputs:
                entry["candidate_labels"] = {"content": ["news", "sports"], "shape": [2]}
        entries.append(entry)
    return {"data": entries}


def run(
    url: str,
    model: str,
    concurrency: int,
    protocol: str = "grpc",
    data: dict[str, Any] | None = None,
    streaming: bool = False,
    window_ms: int = 2000,
    quick: bool = False,
    timeout: float = 600,
) -> PerfAnalyzerRun:
    """One perf_analyzer measurement at a concurrency level; raises with its output when it fails.
    `quick`: a few counted windows of 16 requests taken as they come (for tests, not figures)."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch, "report.csv")
        command = [str(binary()), "-m", model, "-u", url, "-i", protocol, "--concurrency-range", str(concurrency),
                   "--measurement-interval", str(window_ms), "-f", str(report)]  # fmt: skip
        if data is not None:
            path = Path(scratch, "input.json")
            path.write_text(json.dumps(data))
            command += ["--input-data", str(path)]
        if streaming:
            command.append("--streaming")
        if quick:
            command += ["--measurement-mode", "count_windows", "--measurement-request-count", "16",
                        "--stability-percentage", "1000", "--max-trials", "3"]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, env=environment(), timeout=timeout)
        if done.returncode != 0 or not report.exists():
            raise RuntimeError(f"perf_analyzer failed ({done.returncode}): {(done.stdout + done.stderr)[-2000:]}")
        [row] = list(csv.DictReader(report.open()))
    return _level(row)


def _level(row: dict[str, str]) -> PerfAnalyzerRun:
    stages = ("Server Compute Input", "Server Compute Infer", "Server Compute Output")
    compute = sum(float(row.get(stage) or 0) for stage in stages)
    return PerfAnalyzerRun(
        concurrency=int(row["Concurrency"]),
        per_second=float(row["Inferences/Second"]),
        p50_us=float(row["p50 latency"]),
        p90_us=float(row["p90 latency"]),
        p99_us=float(row["p99 latency"]),
        server_queue_us=float(row.get("Server Queue", 0) or 0),
        server_compute_us=compute,
    )


def timings(model: str, protocol: str, levels: list[PerfAnalyzerRun]) -> list[dict[str, Any]]:
    """The bench's timing rows (texts/s is perf_analyzer's inferences/s at batch 1)."""
    return [
        Timing(
            f"{model}, perf_analyzer {protocol}",
            f"{level.concurrency} clients",
            level.p50_us / 1000,
            level.p90_us / 1000,
            level.p99_us / 1000,
            level.per_second,
            0.0,
            0,
        ).row()
        for level in levels
    ]


def bench_with_perf_analyzer(
    url: str,
    http: str | None,
    model: str,
    texts: list[str],
    concurrency: list[int],
    progress: Any,
    quick: bool = False,
) -> dict[str, Any]:
    """`kiln bench serve --url --perf-analyzer`: the concurrency sweep through perf_analyzer, over
    gRPC and (given --http-url) REST; a generator streams over gRPC only, as Triton's does.
    `quick`: see `run` (tests: perf_analyzer's 10% stability rule is not met on a noisy machine)."""
    why = unusable()
    if why:
        raise SystemExit(why)
    target = discover(url, http, model)
    generator = spec_for(target.task).generative
    mask_token = _config_string(url, model, "mask_token")
    needs_data = generator or bool(mask_token) or target.task == "zero-shot-classification"
    inputs = [target.input_name, "candidate_labels"]
    data = input_data(texts, inputs, generator, mask_token=mask_token) if needs_data else None
    protocols = [("grpc", url)] + ([("http", http.split("://", 1)[-1])] if http and not generator else [])
    rows = []
    for protocol, address in protocols:
        levels = []
        for level in concurrency:
            progress(f"perf_analyzer: {protocol}, {level} concurrent clients")
            levels.append(run(address, model, level, protocol, data, streaming=generator, quick=quick))
        rows += timings(model, protocol, levels)
    return {"task": f"{target.task} at {url}", "texts": len(texts), "timings": rows, "checks": {}}


def _config_string(url: str, model: str, key: str) -> str:
    import tritonclient.grpc as triton

    parameters = triton.InferenceServerClient(url).get_model_config(model).config.parameters
    return parameters[key].string_value if key in parameters else ""
