"""The server's own cost (issue 20): kiln's process layouts beside the floor of its stack, under
load generators that are not Python, with a model that costs almost nothing, so what is measured
is the server.

Layouts, in alternating rounds (each round starts every server afresh, one at a time):
- `floor`: a bare grpc.aio server answering a canned ModelInferResponse (kiln.bench.floor);
- `kiln`: `kiln serve` as one process;
- `kiln --frontends N`: N front-end processes before one engine process, for each N asked for.

Per layout: requests/s at 64 concurrent streams from h2load (KServe gRPC, a framed ModelInferRequest,
4 connections x 16 streams, so the kernel can spread connections over front-ends) and from wrk (KServe
REST, 64 connections), the CPU time the server's processes spent per request, and every answer
checked: the server's own request counter must have grown by the requests sent, all OK (h2load sees
HTTP 200 for a gRPC error). Then a lone request's p50/p99 through tritonclient against the raw
pipeline (tokenize, run, post-process in process) for the same text, and the raw session fed
batches of 64 copies of it: what a server that batches perfectly could reach (the GPU target).

    python -m kiln.bench.server_cost build/tiny-bert-fp32 --corpus ../shared/data/sentences.txt \
        --frontends 1 2 --out bench/results/server-cost
    python -m kiln.bench.server_cost roberta-fp16-cuda --provider cuda --frontends 2 4 8 ...   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from kiln.bench.report import machine
from kiln.bench.stats import free_port, read_corpus

STREAMS = 64
CONNECTIONS = 4
LONE_REQUESTS = 1000
MODEL = "tiny"
RAW_BATCH = 64
RAW_SECONDS = 5.0


@dataclass
class Layout:
    name: str
    args: list[str] | None  # kiln serve flags; None: the floor
    results: dict[str, list[float]] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.results.setdefault(key, []).append(value)


class Running:
    """A server of one layout on free ports, stopped with SIGTERM."""

    def __init__(self, layout: Layout, package: Path):
        self.grpc, self.http, self.metrics = free_port(), free_port(), free_port()
        if layout.args is None:
            command = [sys.executable, "-m", "kiln.bench.floor", "--port", str(self.grpc)]
            self.http = self.metrics = 0
        else:
            command = [sys.executable, "-m", "kiln.runtime.cli", "serve", str(package), "--name", MODEL,
                       "--grpc-port", str(self.grpc), "--http-port", str(self.http),
                       "--metrics-port", str(self.metrics), *layout.args]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def __enter__(self) -> Running:
        import tritonclient.grpc as triton

        client = triton.InferenceServerClient(f"127.0.0.1:{self.grpc}")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"server exited: {self.process.stderr.read()[-2000:]}")
            try:
                if client.is_server_ready():
                    return self
            except Exception:
                pass
            time.sleep(0.2)
        raise SystemExit("server did not start")

    def __exit__(self, *exc: object) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) of the server and every process under it, by role: the engine,
        the front-ends, and the rest (the supervisor; the one process of the single layout)."""
        roles: dict[str, float] = {}
        for pid in _tree(self.process.pid):
            try:
                name = Path(f"/proc/{pid}/comm").read_text().strip()
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            role = "engine" if name == "kiln-engine" else "frontends" if name.startswith("kiln-frontend") else "rest"
            roles[role] = roles.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / _ticks()
        return roles

    def answered_ok(self) -> float:
        """The server's own count of OK requests (0 for the floor, which keeps none)."""
        if not self.metrics:
            return 0.0
        page = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=10).read().decode()
        return sum(float(v) for v in re.findall(r'^kiln_requests_total\{[^}]*code="OK"[^}]*\} (\S+)$', page, re.M))


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parts = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(parts[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _ticks() -> int:
    import os

    return os.sysconf("SC_CLK_TCK")


def grpc_body(text: str, path: Path) -> Path:
    """One ModelInferRequest for `text`, gRPC-framed (a 5-byte prefix), as h2load sends it."""
    from kiln.proto import grpc_service_pb2 as pb

    request = pb.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="text", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(text.encode())
    message = request.SerializeToString()
    path.write_bytes(b"\0" + len(message).to_bytes(4, "big") + message)
    return path


def wrk_script(text: str, path: Path) -> Path:
    body = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}]})
    path.write_text(
        f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = {json.dumps(body)}\n'
    )
    return path


def h2load(server: Running, body: Path, requests: int, connections: int = CONNECTIONS) -> float:
    out = subprocess.run(
        ["h2load", "-n", str(requests), "-c", str(connections), "-m", str(STREAMS // connections),
         "-H", "content-type: application/grpc", "-H", "te: trailers", "-d", str(body),
         f"http://127.0.0.1:{server.grpc}/inference.GRPCInferenceService/ModelInfer"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed", out)
    if done is None or int(done.group(2)) != requests:
        raise SystemExit(f"h2load: not every request succeeded:\n{out}")
    return float(re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out).group(1))


def wrk(server: Running, script: Path, seconds: int) -> tuple[float, int]:
    out = subprocess.run(
        ["wrk", "-t2", f"-c{STREAMS}", f"-d{seconds}s", "-s", str(script),
         f"http://127.0.0.1:{server.http}/v2/models/{MODEL}/infer"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    if "Non-2xx" in out:
        raise SystemExit(f"wrk: some requests failed:\n{out}")
    total = int(re.search(r"(\d+) requests in", out).group(1))
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), total


def lone_requests(server: Running, text: str) -> list[float]:
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    tensor = triton.InferInput("text", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([text.encode()], dtype=object))
    for _ in range(50):
        client.infer(MODEL, [tensor])
    times = []
    for _ in range(LONE_REQUESTS):
        start = time.perf_counter()
        client.infer(MODEL, [tensor])
        times.append(time.perf_counter() - start)
    return times


def raw_pipeline(package: Path, text: str, provider: str) -> list[float]:
    """Tokenize, run and post-process one text in process: what a server adds its cost to."""
    from kiln.runtime import pipeline

    pipe = pipeline(package, provider=provider)
    for _ in range(50):
        pipe(text)
    times = []
    for _ in range(LONE_REQUESTS):
        start = time.perf_counter()
        pipe(text)
        times.append(time.perf_counter() - start)
    return times


def raw_batched(package: Path, text: str, provider: str, batch: int = RAW_BATCH) -> float:
    """Texts/s of the bare session fed batches of `batch` copies of the text (tokenize, pad, run):
    the most a server could make of the model, since it batches one-text requests at best into this."""
    from kiln.runtime.package import load_package
    from kiln.runtime.session import SessionOptions

    loaded = load_package(package, SessionOptions(provider=provider, max_batch=batch))
    texts = [text] * batch

    def run() -> None:
        loaded.run(loaded.encoder.pad(loaded.encoder.tokenize(texts)))

    for _ in range(10):
        run()
    start, rounds = time.perf_counter(), 0
    while time.perf_counter() - start < RAW_SECONDS:
        run()
        rounds += 1
    return rounds * batch / (time.perf_counter() - start)


def measure(layout: Layout, package: Path, text: str, files: dict[str, Path], requests: int, connections: int) -> None:
    with Running(layout, package) as server:
        h2load(server, files["grpc"], min(2000, requests), connections)  # warm up: connections, threads, caches
        before_ok, before_cpu = server.answered_ok(), server.cpu_seconds()
        layout.add("grpc_rps", h2load(server, files["grpc"], requests, connections))
        after_cpu = server.cpu_seconds()
        for role in after_cpu:
            spent = after_cpu[role] - before_cpu.get(role, 0.0)
            layout.add(f"cpu_us_{role}", 1e6 * spent / requests)
        layout.add("grpc_cpu_us", 1e6 * sum(after_cpu[r] - before_cpu.get(r, 0.0) for r in after_cpu) / requests)
        if layout.args is not None:
            answered = server.answered_ok() - before_ok
            if answered != requests:
                raise SystemExit(f"{layout.name}: {requests} requests sent, {answered:.0f} answered OK")
            before_ok = server.answered_ok()
            rps, sent = wrk(server, files["wrk"], max(3, requests // 4000))
            answered = server.answered_ok() - before_ok
            if answered < sent:
                raise SystemExit(f"{layout.name}: wrk sent {sent} requests, {answered:.0f} answered OK")
            layout.add("rest_rps", rps)
        times = lone_requests(server, text)
        layout.add("lone_p50_ms", 1e3 * statistics.median(times))
        layout.add("lone_p99_ms", 1e3 * float(np.percentile(times, 99)))


def markdown(
    layouts: list[Layout], raw: list[float], batched: float, text: str, package: Path, connections: int
) -> str:
    floor = next(layout for layout in layouts if layout.args is None)
    raw_p50 = 1e3 * statistics.median(raw)

    def span(values: list[float], fmt: str = ",.0f") -> str:
        return f"{min(values):{fmt}}-{max(values):{fmt}}" if values else "-"

    lines = [
        f"# The server's own cost — {machine()}",
        "",
        f"Model: {package} (raw pipeline, one text in process: p50 {raw_p50:.3f} ms; raw session in batches "
        f"of {RAW_BATCH}: {batched:,.0f} texts/s). Text: {text!r}.",
        f"Ranges over {len(floor.results['grpc_rps'])} alternating rounds. {STREAMS} streams: h2load "
        f"{connections} connections x {STREAMS // connections} streams (gRPC), wrk {STREAMS} connections (REST).",
        "",
        "| layout | gRPC req/s (h2load) | x floor | server CPU us/req (engine + front-ends + rest) | "
        "x raw batched | REST req/s (wrk) | lone p50 ms (tritonclient) | lone p99 ms | p50 over raw, ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    floor_rps = statistics.median(floor.results["grpc_rps"])
    for layout in layouts:
        r = layout.results
        ratio = statistics.median(r["grpc_rps"]) / floor_rps
        over = [p - raw_p50 for p in r["lone_p50_ms"]] if layout.args is not None else []
        roles = [role for role in ("engine", "frontends", "rest") if f"cpu_us_{role}" in r]
        split = " + ".join(f"{statistics.median(r[f'cpu_us_{role}']):,.0f}" for role in roles)
        lines.append(
            f"| {layout.name} | {span(r['grpc_rps'])} | {ratio:.2f} | {span(r['grpc_cpu_us'])} ({split}) | "
            f"{statistics.median(r['grpc_rps']) / batched:.2f} | "
            f"{span(r.get('rest_rps', []))} | {span(r['lone_p50_ms'], '.2f')} | {span(r['lone_p99_ms'], '.2f')} | "
            f"{span(over, '.2f')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", type=Path)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--frontends", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--serve-args", default="", help="more `kiln serve` flags for every kiln layout")
    parser.add_argument(
        "--connections", type=int, default=CONNECTIONS,
        help=f"h2load's connections for the {STREAMS} streams: the kernel spreads connections, not streams, over "
        "front-ends, so a few connections load a few front-ends (64: one per caller, as 64 clients would)",
    )  # fmt: skip
    parser.add_argument("--provider", default="cpu", help="cpu or cuda: the server's, the raw pipeline's and session's")
    args = parser.parse_args(argv)
    extra = [*args.serve_args.split(), "--provider", args.provider]
    for tool in ("h2load", "wrk"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: apt-get install nghttp2-client wrk")
    texts = sorted(read_corpus(args.corpus), key=len)
    text = texts[len(texts) // 2]  # a sentence of the corpus's median length
    layouts = [Layout("floor (bare grpc.aio)", None), Layout("kiln, one process", extra)]
    layouts += [Layout(f"kiln --frontends {n}", ["--frontends", str(n), *extra]) for n in args.frontends]
    with tempfile.TemporaryDirectory() as folder:
        files = {
            "grpc": grpc_body(text, Path(folder) / "infer.bin"),
            "wrk": wrk_script(text, Path(folder) / "post.lua"),
        }
        for _ in range(args.rounds):
            for layout in layouts:
                measure(layout, args.package, text, files, args.requests, args.connections)
    raw = raw_pipeline(args.package, text, args.provider)
    batched = raw_batched(args.package, text, args.provider)
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(layouts, raw, batched, text, args.package, args.connections)
    (args.out / "results.md").write_text(table)
    results = {"machine": machine(), "text": text, "raw_ms": [1e3 * t for t in raw], "raw_batched_per_s": batched}
    results["layouts"] = {layout.name: layout.results for layout in layouts}
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(table)


if __name__ == "__main__":
    main()
