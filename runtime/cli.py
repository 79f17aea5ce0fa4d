"""The `kiln` command. Subcommands import their heavy parts only when run, so the serving
install (no PyTorch) can run everything except `kiln export`."""

from __future__ import annotations

import argparse
import json
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
