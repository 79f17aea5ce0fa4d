"""Markdown table, JSON and PNG plots of a bench run."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any


def machine() -> str:
    import os

    from kiln.runtime.cpu import cpu_name, int8_kernel

    return (
        f"{cpu_name()} ({int8_kernel()} int8), {os.cpu_count()} cores, {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}"
    )


def markdown(results: dict[str, Any]) -> str:
    lines = [f"# kiln bench — {results['machine']}", ""]
    for section in ("model", "serve"):
        if section not in results:
            continue
        data = results[section]
        lines += [
            f"## {section}: {data['task']}, {data['texts']} texts{_grouping(data)}",
            "",
            "| engine | setting | p50 ms | p90 ms | p99 ms | texts/s | tokens/s | errors |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for t in data["timings"]:
            lines.append(
                f"| {t['name']} | {t['setting']} | {t['p50_ms']:.1f} | {t['p90_ms']:.1f} | {t['p99_ms']:.1f} "
                f"| {t['texts_per_s']:.1f} | {t['tokens_per_s']:.0f} | {t['errors']} |"
            )
        lines.append("")
        for a in data.get("accuracy", []):
            figures = ", ".join(f"{k} {v:.4f}" for k, v in a.items() if isinstance(v, float))
            lines.append(f"- accuracy of {a['engine']} ({a['setting']}) against PyTorch: {figures}")
        for name, value in data.get("checks", {}).items():
            if isinstance(value, float):
                lines.append(f"- {name}: {value:.2f}")
        for verdict in data.get("verdicts", []):
            lines.append(f"- {verdict}")
        lines.append("")
    if "soak" in results:
        from kiln.bench.soak import markdown as soak_markdown

        lines.append(soak_markdown(results["soak"]))
    if "gpu" in results:
        from kiln.bench.gpu import markdown as gpu_markdown

        lines.append(gpu_markdown(results["gpu"]))
    if "footprint" in results:
        lines += ["## footprint", "", "| engine | import s | load s | max RSS MB |", "|---|---:|---:|---:|"]
        for row in results["footprint"]:
            lines.append(f"| {row['engine']} | {row['import_s']:.2f} | {row['load_s']:.2f} | {row['max_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def plots(results: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if "serve" in results:
        timings = results["serve"]["timings"]
        fig, ax = plt.subplots(figsize=(6, 4))
        swept = {t["name"] for t in timings if t["setting"].endswith("clients")}
        for name in sorted(swept):
            closed = [t for t in timings if t["name"] == name and t["setting"].endswith("clients")]
            levels = [int(t["setting"].split()[0]) for t in closed]
            ax.plot(levels, [t["texts_per_s"] for t in closed], marker="o", label=name)
        baselines = [t for t in timings if t["name"] not in swept]
        for t, color in zip(baselines, ("tab:green", "tab:orange", "tab:red", "tab:purple"), strict=False):
            ax.axhline(
                t["texts_per_s"], linestyle="--", linewidth=1.2, color=color, label=f"{t['name']}, {t['setting']}"
            )
        ax.set(xscale="log", xlabel="concurrent clients", ylabel="texts/s", title="throughput against concurrency")
        ax.legend(fontsize=7)
        written.append(_save(fig, out / "throughput.png"))
        fig, ax = plt.subplots(figsize=(6, 4))
        samples = results["serve"]["checks"].get("latencies_ms", {}).get("half_peak")
        if samples:
            ax.hist(samples, bins=50)
        ax.set(xlabel="latency ms", ylabel="requests", title="latency at half of peak throughput (open loop)")
        written.append(_save(fig, out / "latency.png"))
    if "gpu" in results:
        from kiln.bench.gpu import plot as gpu_plot

        written.append(gpu_plot(results["gpu"], out))
    if "model" in results:
        model = results["model"]
        fig, ax = plt.subplots(figsize=(6, 4))
        speed = {(t["name"], t["setting"]): t["texts_per_s"] for t in model["timings"]}
        for a in model["accuracy"]:
            score = a.get("agreement", a.get("mean_cosine"))
            ax.scatter(speed[(a["engine"], a["setting"])], score)
            ax.annotate(f"{a['engine']} {a['setting']}", (speed[(a["engine"], a["setting"])], score), fontsize=7)
        ax.set(xlabel="texts/s", ylabel="agreement with PyTorch", title="speed against accuracy")
        written.append(_save(fig, out / "speed_accuracy.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _grouping(data: dict[str, Any]) -> str:
    return ", length-grouped batches" if data.get("length_grouped") else ""


def write(results: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    (out / "results.md").write_text(markdown(results))
    return [out / "results.json", out / "results.md", *plots(results, out)]


def main() -> None:
    """Re-render the table and plots of a results.json: python -m kiln.bench.report DIR."""
    import sys

    out = Path(sys.argv[1])
    results = json.loads((out / "results.json").read_text())
    for path in write(results, out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
