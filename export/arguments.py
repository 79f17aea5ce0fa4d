"""`kiln export` arguments, importable without the export extra so `kiln --help` always works."""

from __future__ import annotations

import argparse
from pathlib import Path

QUANTIZE_CHOICES = ("none", "int8", "int8-static", "fp16")


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Hub id (user/name) or local model directory")
    parser.add_argument("--revision", help="Hub branch, tag or commit")
    parser.add_argument("--task", help="task (default: from the model's head)")
    parser.add_argument("--quantize", default="none", choices=QUANTIZE_CHOICES, help="precision of the package")
    parser.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda", "tensorrt"),
        help="the execution provider the graph is shaped for: cpu (CPU fusions, kiln's int8), cuda (fused "
        "contrib ops, fp16), tensorrt (standard ops only; int8 as explicit Q/DQ)",
    )
    parser.add_argument(
        "--int8-cpus",
        default="any",
        choices=("any", "vnni"),
        help="the CPUs an int8 package must run on: any (63 weight levels a side, exact on every CPU) or vnni "
        "(127 levels, more accurate; needs AVX-512 VNNI, AVX-VNNI, AMX or ARM dot products, and refuses to load "
        "on other CPUs)",
    )
    parser.add_argument("--output", type=Path, help="package directory (default: ./<model name>-<precision>)")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--max-length", type=int, help="maximum sequence length (default: the model's)")
    parser.add_argument(
        "--calibration",
        type=Path,
        help="text file, one example a line: calibrates int8, and validates what it holds out",
    )
    parser.add_argument(
        "--validation", type=Path, help="text file the gate validates on (default: held out of the calibration text)"
    )
    parser.add_argument("--validation-items", type=int, default=400, help="held-out items the gate checks, at most")
    parser.add_argument(
        "--min-agreement",
        type=float,
        help="held-out agreement the package must reach: top-1 for encoders (default 0.99); for generators at "
        "int8/fp16 the share of prompts with greedy output identical to transformers (default 0.95; fp32: all)",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    parser.add_argument("--no-optimize", action="store_true", help="skip onnxruntime's transformer fusions")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--json", action="store_true", help="print one JSON result and no progress")
    parser.add_argument("--quiet", action="store_true", help="no progress, only the summary")
