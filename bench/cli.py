"""`kiln bench model|serve|all|gpu|soak|generate`: arguments, progress, verdicts against the targets."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from kiln.bench import footprint, report, serve
from kiln.bench.stats import read_corpus

TARGETS = {
    "eager_batch1": 4.0,
    "eager_batch32": 3.0,
    "agreement": 0.99,
    "int8_agreement": 0.995,  # held-out top-1 agreement of a real fine-tuned classifier's int8
    "int8_vs_fp32": 1.5,  # one text at a time (MiniLM-sized; 2x for roberta-base-sized)
    "int8_vs_optimum": 1.0,  # no slower than optimum's default dynamic int8
    "int8_batched_vs_one": 1.3,  # kiln int8 in batches of 32 against one text at a time (roberta-base-sized)
    "serve_vs_raw": 1.0,
    "serve_vs_raw_batched": 0.9,  # on a GPU: the server against the raw session fed ideal batches
    "serve_vs_optimum": 2.5,
    "p99_ratio": 3.0,
    "overhead_ms": 2.0,
    "rest_vs_grpc": 0.85,  # REST within 15% of gRPC
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=["model", "serve", "all", "gpu", "soak", "generate"])
    parser.add_argument(
        "package",
        type=Path,
        nargs="*",
        help="package to measure (model: more of the same model are measured beside it; gpu: one or more)",
    )
    parser.add_argument(
        "--url", help="serve: measure a running server at this gRPC HOST:PORT instead; generate: a kiln server too"
    )
    parser.add_argument("--http-url", help="serve --url: its HTTP base URL too (http://HOST:PORT), for KServe REST")
    parser.add_argument(
        "--perf-analyzer",
        action="store_true",
        help="serve --url: drive the server with Triton's perf_analyzer instead of kiln's Python clients",
    )
    parser.add_argument("--model", help="serve --url: the model to measure; generate: a local Hugging Face model DIR")
    parser.add_argument("--rates", default="", help="serve --url: open-loop requests/s (default: 1/2 and 4/5 of peak)")
    parser.add_argument("--seconds", type=float, default=20.0, help="serve --url: seconds per open-loop rate")
    parser.add_argument("--minutes", type=float, default=5.0, help="soak: minutes of steady load")
    parser.add_argument("--rate", type=float, default=20.0, help="soak: requests/s (open loop)")
    parser.add_argument("--source", type=Path, help="the PyTorch model it was exported from (model bench)")
    parser.add_argument("--fp32", type=Path, help="an fp32 package of the same model, to compare with")
    parser.add_argument(
        "--length-grouped",
        action="store_true",
        help="model: texts in order of length, so each batch holds texts of similar length (as a busy "
        "server's batcher groups them) instead of corpus order",
    )
    parser.add_argument("--corpus", type=Path, required=True, help="text file, one text a line")
    parser.add_argument("--limit", type=int, default=256, help="texts from the corpus")
    parser.add_argument("--batch-sizes", help="default 1,32 (model), 1,8,32,128 (gpu)")
    parser.add_argument("--lengths", default="128,512", help="gpu: sequence lengths of the table")
    parser.add_argument("--torch", default="fp32,fp16,compile", help="gpu: PyTorch engines (fp32 is the reference)")
    parser.add_argument("--cell-seconds", type=float, default=2.0, help="gpu: time per engine per table cell")
    parser.add_argument(
        "--provider",
        help="cpu | cuda | tensorrt: where packages run (default: cpu; gpu: each package's export target)",
    )
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--requests", type=int, default=256, help="requests per concurrency level")
    parser.add_argument("--server-args", default="", help="extra `kiln serve` flags, quoted")
    parser.add_argument(
        "--package", type=Path, action="append", dest="packages", help="generate: a kiln package (repeatable)"
    )
    parser.add_argument(
        "--engines",
        default="transformers,optimum,ctranslate2-fp32,ctranslate2-int8",
        help="generate: engines beside the --package ones (transformers is the accuracy reference)",
    )
    parser.add_argument("--new-tokens", type=int, default=64, help="generate: new tokens per prompt, exactly")
    parser.add_argument("--prompts", type=int, default=32, help="generate: corpus prompts for one stream")
    parser.add_argument("--streams", default="1,8,32", help="generate: concurrent streams (batched for in-process)")
    parser.add_argument("--served-model", help="generate --url: the model's name on the server (default: --model's)")
    parser.add_argument(
        "--openai-url", help="generate: an OpenAI-compatible server's base URL (http://HOST:PORT/v1), by the openai SDK"
    )
    parser.add_argument(
        "--open-loop-rates", default="", help="generate: open-loop requests/s for the servers (e.g. 0.5,1,2)"
    )
    parser.add_argument("--open-loop-seconds", type=float, default=20.0, help="generate: seconds of arrivals per rate")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))


class Progress:
    """Numbered stages on stderr: `[3/11] serve: kiln serve, 16 concurrent clients`."""

    def __init__(self, total: int):
        self.total, self.done = total, 0

    def __call__(self, message: str) -> None:
        self.done += 1
        width = 20
        filled = int(width * min(self.done, self.total) / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        print(f"[{bar}] {self.done}/{self.total} {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    if args.what == "generate":
        return _run_generate(args)
    texts = read_corpus(args.corpus, args.limit)
    if args.what == "gpu":
        return _run_gpu(args, texts)
    if args.what == "soak":
        return _run_soak(args, texts)
    if args.url:
        return _run_remote(args, texts)
    if len(args.package) != 1 and not (args.what == "model" and args.package):
        raise SystemExit(f"kiln bench {args.what} measures one package (kiln bench model and gpu take several)")
    args.package, beside = args.package[0], tuple(args.package[1:])
    sizes = _ints(args.batch_sizes or "1,32")
    levels = _ints(args.concurrency)
    model_steps = len(sizes) if args.what in ("model", "all") else 0
    serve_steps = serve.serve_steps(levels) if args.what in ("serve", "all") else 0
    progress = Progress(model_steps + serve_steps)
    results: dict[str, Any] = {"machine": report.machine(), "package": str(args.package), "corpus": str(args.corpus)}
    if args.what in ("model", "all"):
        from kiln.bench.model import bench_model

        if args.source is None:
            raise SystemExit("kiln bench model needs --source (the PyTorch model directory)")
        results["model"] = bench_model(
            args.package,
            args.source,
            args.fp32,
            texts,
            sizes,
            progress,
            args.provider or "cpu",
            args.length_grouped,
            beside,
        )
        results["model"]["verdicts"] = model_verdicts(results["model"])
        results["footprint"] = footprint.bench_footprint(args.package, args.source, results["model"]["task"])
    if args.what in ("serve", "all"):
        results["serve"] = serve.bench_serve(
            args.package, texts, levels, args.requests, args.server_args.split(), progress, args.provider or "cpu"
        )
        results["serve"]["verdicts"] = serve_verdicts(results["serve"]["checks"])
    for path in report.write(results, args.out):
        print(f"wrote {path}", file=sys.stderr)
    print(report.markdown(results))
    return 0


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",")]


def _run_soak(args: argparse.Namespace, texts: list[str]) -> int:
    from kiln.bench.soak import bench_soak

    if not args.url and len(args.package) != 1:
        raise SystemExit("kiln bench soak PKG (or --url HOST:PORT --model NAME)")
    package = args.package[0] if args.package else None
    windows = max(1, int(args.minutes * 60 / 30))
    results: dict[str, Any] = {"machine": report.machine(), "corpus": str(args.corpus)}
    results["soak"] = bench_soak(
        package, args.url, args.model, texts, args.rate, args.minutes, args.server_args.split(), Progress(windows)
    )
    for path in report.write(results, args.out):
        print(f"wrote {path}", file=sys.stderr)
    print(report.markdown(results))
    return 1 if results["soak"]["errors"] else 0


def _run_remote(args: argparse.Namespace, texts: list[str]) -> int:
    from kiln.bench.remote import bench_remote, remote_steps

    if args.what != "serve" or not args.model:
        raise SystemExit("--url measures a running server: kiln bench serve --url HOST:PORT --model NAME")
    levels, rates = _ints(args.concurrency), [float(r) for r in args.rates.split(",") if r]
    progress = Progress(remote_steps(levels, rates, bool(args.http_url)))
    results: dict[str, Any] = {"machine": report.machine(), "url": args.url, "corpus": str(args.corpus)}
    if args.perf_analyzer:
        from kiln.bench.perf_analyzer import bench_with_perf_analyzer

        results["serve"] = bench_with_perf_analyzer(args.url, args.http_url, args.model, texts, levels, progress)
    else:
        results["serve"] = bench_remote(
            args.url, args.http_url, args.model, texts, levels, args.requests, rates, args.seconds, progress
        )
    for path in report.write(results, args.out):
        print(f"wrote {path}", file=sys.stderr)
    print(report.markdown(results))
    return 0


def _run_generate(args: argparse.Namespace) -> int:
    from kiln.bench import generate

    if not args.model or not Path(args.model, "config.json").is_file():
        raise SystemExit(
            "kiln bench generate needs --model DIR, a local Hugging Face model "
            "(python -m kiln.bench.generate gpt2|bart DIR builds a random-weight one)"
        )
    options = generate.Options(
        model=Path(args.model),
        engines=[name for name in args.engines.split(",") if name],
        packages=args.packages or [],
        new_tokens=args.new_tokens,
        prompts=args.prompts,
        streams=_ints(args.streams),
        url=args.url,
        openai_url=args.openai_url,
        served_model=args.served_model,
        rates=[float(rate) for rate in args.open_loop_rates.split(",") if rate],
        rate_seconds=args.open_loop_seconds,
        cache=args.out / "cache",
        provider=args.provider or "cpu",
    )
    progress = Progress(generate.steps(options))
    results: dict[str, Any] = {"machine": report.machine(), "source": args.model, "corpus": str(args.corpus)}
    results["generate"] = generate.bench_generate(options, read_corpus(args.corpus), progress)
    for path in generate.write(results, args.out):
        print(f"wrote {path}", file=sys.stderr)
    print(generate.render(results))
    return 0


def _run_gpu(args: argparse.Namespace, texts: list[str]) -> int:
    from kiln.bench.gpu import bench_gpu

    if args.source is None:
        raise SystemExit("kiln bench gpu needs --source (the PyTorch model directory)")
    sizes, lengths = _ints(args.batch_sizes or "1,8,32,128"), _ints(args.lengths)
    progress = Progress(1 + 1 + len(sizes) * len(lengths))
    results: dict[str, Any] = {"machine": report.machine(), "package": [str(p) for p in args.package]}
    results["gpu"] = bench_gpu(
        args.package,
        args.source,
        texts,
        args.provider,
        sizes,
        lengths,
        args.torch.split(","),
        args.cell_seconds,
        progress,
    )
    for path in report.write(results, args.out):
        print(f"wrote {path}", file=sys.stderr)
    print(report.markdown(results))
    return 0


def model_verdicts(data: dict[str, Any]) -> list[str]:
    """Ratios against PyTorch eager, ONNX fp32 and optimum's int8, each with a plain MET / SHORT."""
    verdicts = []
    by = {(t["name"], t["setting"]): t for t in data["timings"]}
    ours = f"kiln-{data['precision']}"
    rows = [("pytorch-eager", "batch 1", "eager_batch1"), ("pytorch-eager", "batch 32", "eager_batch32")]
    rows += [("onnx-fp32", "batch 1", "int8_vs_fp32"), ("optimum-int8", "batch 1", "int8_vs_optimum")]
    for other, setting, target_key in rows:
        if (ours, setting) in by and (other, setting) in by:
            ratio = by[(ours, setting)]["texts_per_s"] / by[(other, setting)]["texts_per_s"]
            target = TARGETS[target_key]
            verdicts.append(
                f"{ours} vs {other} at {setting}: {ratio:.2f}x ({'MET' if ratio >= target else 'SHORT'} of {target}x)"
            )
    alone, batched = by.get((ours, "batch 1")), by.get((ours, "batch 32"))
    if data["precision"].startswith("int8") and alone and batched:
        ratio, target = batched["texts_per_s"] / alone["texts_per_s"], TARGETS["int8_batched_vs_one"]
        order = "length-grouped" if data.get("length_grouped") else "corpus-order"
        verdicts.append(
            f"{ours} {order} batches of 32 vs one text at a time: {ratio:.2f}x "
            f"({'MET' if ratio >= target else 'SHORT'} of {target}x)"
        )
    floor = TARGETS["int8_agreement"] if data["precision"].startswith("int8") else TARGETS["agreement"]
    for a in data["accuracy"]:
        if "agreement" in a:
            verdict = "MET" if a["agreement"] >= floor else "SHORT"
            verdicts.append(f"{a['engine']} agreement at {a['setting']}: {a['agreement']:.4f} ({verdict} of {floor})")
    return verdicts


def serve_verdicts(checks: dict[str, Any]) -> list[str]:
    rows = [
        (
            "KServe gRPC (tritonclient) vs raw session one at a time",
            "kserve-grpc_vs_raw_one_at_a_time",
            "serve_vs_raw",
            True,
        ),
        ("KServe REST vs raw session one at a time", "kserve-http_vs_raw_one_at_a_time", "serve_vs_raw", True),
        ("kiln.v1 vs raw session one at a time", "typed_vs_raw_one_at_a_time", "serve_vs_raw", True),
        ("KServe REST vs KServe gRPC", "kserve-http_vs_kserve-grpc", "rest_vs_grpc", True),
        ("KServe gRPC vs raw session in batches (GPU)", "kserve-grpc_vs_raw_batched", "serve_vs_raw_batched", True),
        ("server vs optimum pipeline batch 32", "serve_vs_optimum_batch32", "serve_vs_optimum", True),
        ("p99 at half peak / single-request p50", "p99_half_peak_vs_single_p50", "p99_ratio", False),
        ("p99 at half peak / single-request p99", "p99_half_peak_vs_single_p99", "p99_ratio", False),
        ("single-request overhead ms", "single_request_overhead_ms", "overhead_ms", False),
    ]
    verdicts = []
    for name, key, target_key, higher_is_better in rows:
        value, target = checks.get(key), TARGETS[target_key]
        if value is None:
            continue
        ok = value >= target if higher_is_better else value <= target
        verdicts.append(
            f"{name}: {value:.2f} ({'MET' if ok else 'SHORT'}; target {'>=' if higher_is_better else '<='} {target})"
        )
    return verdicts
