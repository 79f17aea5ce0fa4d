"""The `kiln` command. Subcommands import their heavy parts only when run, so the serving
install (no PyTorch) can run everything except `kiln export`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import numpy as np
from kiln.export.arguments import add_export_arguments
from kiln.runtime.errors import KilnError, MissingDependency


def _export(args: argparse.Namespace) -> int:
    for module in ("torch", "transformers", "optimum.exporters.onnx", "onnx"):
        try:
            __import__(module)
        except ImportError as exc:
            raise MissingDependency(
                f"`kiln export` needs the export extra ({module} is missing): pip install 'kiln[export]'"
            ) from exc
    from kiln.export.cli import run

    return run(args)


def _predict(args: argparse.Namespace) -> int:
    from kiln.runtime import pipeline

    pipe = pipeline(args.package, provider=args.provider)
    texts = args.text or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if pipe.task == "question-answering":
        if not args.context:
            raise SystemExit("kiln predict: question-answering needs --context")
        result: Any = pipe(texts, [args.context] * len(texts))
    else:
        result = pipe(texts)
    if isinstance(result, np.ndarray):
        result = result.tolist()
    print(json.dumps(result, ensure_ascii=False, indent=None if args.compact else 2))
    return 0


def _serve(args: argparse.Namespace) -> int:
    import asyncio
    from pathlib import Path

    from kiln.runtime.serve.batcher import BatchOptions
    from kiln.runtime.serve.server import ServeOptions, configure_logging, serve
    from kiln.runtime.session import SessionOptions

    configure_logging(args.log_format == "json")
    options = ServeOptions(
        packages=[Path(p) for p in args.packages],
        names=args.name or [],
        host=args.host,
        port=args.port,
        max_message_bytes=int(args.max_message_mb * 1024 * 1024),
        batching=BatchOptions(
            max_tokens=args.max_batch_tokens,
            max_size=args.max_batch_size,
            max_delay=args.max_queue_delay_ms / 1000,
            max_queue=args.max_queue,
            instances=args.instances,
        ),
        default_deadline=args.default_deadline or None,
        workers=args.workers,
        session=SessionOptions(provider=args.provider, intra_op_threads=args.threads, spin=args.spin),
        metrics_port=args.metrics_port,
        auth_token=args.auth_token or os.environ.get("KILN_AUTH_TOKEN"),
        tls_cert=args.tls_cert and Path(args.tls_cert),
        tls_key=args.tls_key and Path(args.tls_key),
        grace=args.grace,
    )
    return asyncio.run(serve(options))


def _query(args: argparse.Namespace) -> int:
    from kiln.runtime.client import KilnClient

    texts = args.text or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    with KilnClient(args.address, token=args.token or os.environ.get("KILN_AUTH_TOKEN"), tls_ca=args.tls_ca) as client:
        task = client.model(args.model)["task"]
        calls = {
            "text-classification": lambda: client.classify(args.model, texts, top_k=args.top_k),
            "token-classification": lambda: client.tag(args.model, texts, args.aggregation_strategy),
            "question-answering": lambda: client.answer(args.model, texts, [args.context] * len(texts)),
            "feature-extraction": lambda: client.embed(args.model, texts),
            "fill-mask": lambda: client.fill_mask(args.model, texts, top_k=args.top_k),
            "zero-shot-classification": lambda: client.zero_shot(args.model, texts, args.labels.split(",")),
        }
        print(json.dumps(calls[task](), ensure_ascii=False, indent=2))
    return 0


def _bench(args: argparse.Namespace) -> int:
    try:
        from kiln.bench.cli import run
    except ImportError as exc:
        raise MissingDependency(
            f"`kiln bench` needs the dev extra ({exc.name} is missing): pip install 'kiln[dev]'"
        ) from exc
    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    export = commands.add_parser("export", help="export a Hub or local model to a verified ONNX package")
    add_export_arguments(export)
    export.set_defaults(handler=_export)

    predict = commands.add_parser("predict", help="run texts through a package and print the answers as JSON")
    predict.add_argument("package", help="package directory written by kiln export")
    predict.add_argument("text", nargs="*", help="texts (default: one a line on stdin)")
    predict.add_argument("--context", help="context for question-answering (the texts are questions)")
    predict.add_argument("--provider", default="cpu", help="cpu | cuda | tensorrt | auto")
    predict.add_argument("--compact", action="store_true", help="one line of JSON")
    predict.set_defaults(handler=_predict)

    serve = commands.add_parser("serve", help="serve packages over gRPC (KServe v2 / Triton + kiln.v1)")
    serve.add_argument("packages", nargs="+", help="package directories")
    serve.add_argument("--name", action="append", help="model name per package (default: directory name)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8001)
    serve.add_argument("--max-message-mb", type=float, default=64)
    serve.add_argument("--max-batch-tokens", type=int, default=8192, help="padded tokens per batch")
    serve.add_argument("--max-batch-size", type=int, default=64)
    serve.add_argument("--max-queue-delay-ms", type=float, default=2.0)
    serve.add_argument("--max-queue", type=int, default=1024, help="waiting sequences before RESOURCE_EXHAUSTED")
    serve.add_argument("--default-deadline", type=float, default=30.0, help="seconds, for calls without one")
    serve.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: one per core)")
    serve.add_argument("--workers", type=int, default=8, help="tokenization/post-processing threads")
    serve.add_argument(
        "--instances",
        type=int,
        default=0,
        help="batches run at once per model (0: one per core on CPU, 1 on a GPU)",
    )
    serve.add_argument(
        "--spin",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="let onnxruntime's pool threads busy-wait between ops (lower latency, more CPU)",
    )
    serve.add_argument("--provider", default="cpu", help="cpu | cuda | tensorrt | auto")
    serve.add_argument("--metrics-port", type=int, help="serve Prometheus metrics over HTTP on this port")
    serve.add_argument("--auth-token", help="require 'authorization: Bearer TOKEN' (or set KILN_AUTH_TOKEN)")
    serve.add_argument("--tls-cert", help="PEM certificate chain")
    serve.add_argument("--tls-key", help="PEM private key")
    serve.add_argument("--grace", type=float, default=30.0, help="seconds accepted calls get to finish on SIGTERM")
    serve.add_argument("--log-format", choices=["text", "json"], default="text")
    serve.set_defaults(handler=_serve)

    query = commands.add_parser("query", help="ask a running kiln server (typed kiln.v1 API)")
    query.add_argument("model")
    query.add_argument("text", nargs="*", help="texts (questions for QA; default: one a line on stdin)")
    query.add_argument("--address", default="127.0.0.1:8001")
    query.add_argument("--token")
    query.add_argument("--tls-ca", help="CA certificate for a TLS server")
    query.add_argument("--top-k", type=int, default=1)
    query.add_argument("--aggregation-strategy", default="simple")
    query.add_argument("--context", default="", help="context for question-answering")
    query.add_argument("--labels", default="", help="comma-separated candidate labels for zero-shot")
    query.set_defaults(handler=_query)

    bench = commands.add_parser("bench", help="side-by-side benchmarks (needs kiln[dev])")
    bench.set_defaults(handler=_bench)
    try:
        from kiln.bench.cli import add_arguments as add_bench_arguments
    except ImportError:
        bench.add_argument("rest", nargs=argparse.REMAINDER)
    else:
        add_bench_arguments(bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except KilnError as exc:
        print(f"kiln {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
