"""The `kiln` command. Subcommands import their heavy parts only when run, so the serving
install (no PyTorch) can run everything except `kiln export`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from kiln.export.arguments import add_export_arguments
from kiln.runtime.errors import InvalidInput, KilnError, MissingDependency
from kiln.runtime.serve.arguments import ENVIRONMENT_HELP, add_serve_arguments, take_environment


def _export(args: argparse.Namespace) -> int:
    for module in ("torch", "transformers", "optimum.exporters.onnx", "onnx"):
        try:
            __import__(module)
        except ImportError as exc:
            raise MissingDependency(
                f"`kiln export` needs the export extra ({module} is missing): pip install 'kiln-serve[cpu,export]'"
            ) from exc
    from kiln.export.cli import run

    return run(args)


def _predict(args: argparse.Namespace) -> int:
    """Texts through a package in this process; answers printed as the pipeline returns them."""
    from kiln.runtime import pipeline
    from kiln.runtime.tasks import spec_for

    pipe = pipeline(args.package, provider=args.provider)
    named = _named_texts(spec_for(pipe.task), args)
    result = pipe(*named.values(), **_cli_params(args.param))  # the inputs in the pipeline's own order
    if hasattr(result, "tolist"):
        result = result.tolist()
    print(json.dumps(result, ensure_ascii=False, indent=None if args.compact else 2))
    return 0


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from kiln.runtime.serve.arguments import serve_options
    from kiln.runtime.serve.logs import configure_logging
    from kiln.runtime.serve.server import serve

    configure_logging(args.log_format == "json", args.log_verbose)
    if args.frontends:
        from kiln.runtime.serve.processes import Logging, run

        return run(serve_options(args), args.frontends, Logging(args.log_format == "json", args.log_verbose))
    return asyncio.run(serve(serve_options(args)))


def _query(args: argparse.Namespace) -> int:
    """Ask a running server over KServe v2 gRPC (kiln's, or any with text inputs, Triton included)."""
    from kiln.runtime.client import KilnClient
    from kiln.runtime.tasks import spec_for

    with KilnClient(args.address, token=args.token or os.environ.get("KILN_AUTH_TOKEN"), tls_ca=args.tls_ca) as client:
        spec = spec_for(client.task_of(args.model))
        outputs = client.infer(args.model, _named_texts(spec, args), _cli_params(args.param))
        print(json.dumps(outputs, ensure_ascii=False, indent=2))
    return 0


def _named_texts(spec: Any, args: argparse.Namespace) -> dict[str, list[str]]:
    """The texts (arguments or stdin lines) as the task's first input; its other inputs from flags."""
    texts = args.text or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    named = {spec.rows_input: texts}
    if spec.generative:  # prompts only; generation settings are --param NAME=VALUE
        return named
    for tensor in spec.inputs[1:]:
        value = getattr(args, tensor.name)
        if value is None:
            if not tensor.optional:
                raise InvalidInput(f"a {spec.task} model needs --{tensor.name.replace('_', '-')}")
            continue
        named[tensor.name] = [value] * len(texts) if tensor.per_row else [v.strip() for v in value.split(",")]
    return named


def _cli_params(pairs: list[str]) -> dict[str, Any]:
    """--param NAME=VALUE, the value read as JSON where it is JSON (3, true), else as a string."""
    params: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise InvalidInput(f"--param takes NAME=VALUE, got {pair!r}")
        try:
            params[name] = json.loads(value)
        except json.JSONDecodeError:
            params[name] = value
    return params


def _add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """Texts, the other inputs any task takes (--context, --text-pair, --candidate-labels), --param."""
    from kiln.runtime.tasks import SPECS

    parser.add_argument("text", nargs="*", help="texts (questions for QA; default: one a line on stdin)")
    others = {t.name: t for spec in SPECS.values() if not spec.generative for t in spec.inputs[1:]}
    for name, tensor in others.items():
        flags = [f"--{name.replace('_', '-')}"] + (["--labels"] if name == "candidate_labels" else [])
        what = "the same for every text" if tensor.per_row else "comma-separated"
        parser.add_argument(*flags, dest=name, help=f"input {name!r} ({what})")
    parser.add_argument("--param", action="append", default=[], help="a task parameter, NAME=VALUE (repeatable)")


def _tasks(args: argparse.Namespace) -> int:
    from kiln.runtime.serve.table import markdown

    print(markdown())
    return 0


def _bench(args: argparse.Namespace) -> int:
    try:
        from kiln.bench.cli import run
    except ImportError as exc:
        raise MissingDependency(
            f"`kiln bench` needs the dev extra ({exc.name} is missing): pip install 'kiln-serve[dev]'"
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
    _add_input_arguments(predict)
    predict.add_argument("--provider", default="cpu", help="cpu | cuda | tensorrt | auto")
    predict.add_argument("--compact", action="store_true", help="one line of JSON")
    predict.set_defaults(handler=_predict)

    serve = commands.add_parser(
        "serve",
        help="serve packages over gRPC and HTTP (KServe v2 / Triton, kiln.v1, OpenAI)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog=ENVIRONMENT_HELP,
    )
    add_serve_arguments(serve)
    take_environment(serve, os.environ)
    serve.set_defaults(handler=_serve)

    query = commands.add_parser("query", help="ask a running server over KServe v2 gRPC")
    query.add_argument("model")
    _add_input_arguments(query)
    query.add_argument("--address", default="127.0.0.1:8001")
    query.add_argument("--token")
    query.add_argument("--tls-ca", help="CA certificate for a TLS server")
    query.set_defaults(handler=_query)

    tasks = commands.add_parser("tasks", help="print every task's tensors and parameters (the wire contract)")
    tasks.set_defaults(handler=_tasks)

    bench = commands.add_parser("bench", help="side-by-side benchmarks (needs kiln-serve[dev])")
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
