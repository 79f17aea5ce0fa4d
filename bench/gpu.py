"""`kiln bench gpu`: packages against PyTorch eager (fp32, fp16) and torch.compile in the GPU table
layout, batch 1/8/32/128 x sequence 128/512, each engine beside its accuracy on real sentences.

Shapes are fixed, as GPU tables are: every row of a (batch, length) cell is corpus text, joined and
cut to exactly `length` tokens. Every engine gets the same token ids as host arrays and returns its
output to the host, so transfers count for all alike; tokenization is the same CPU work for every
engine and is left out here (`kiln bench serve` measures requests end to end). In each cell the
engines take turns for ROUNDS rounds. Accuracy is measured on the corpus at its natural lengths
(batches of 32 in corpus order, padded), against PyTorch fp32; a batch at the longest length the
packages take checks that no engine overflows (NaN or inf). For TensorRT packages, the engine
build, the reuse of its cache on a second start, and the rebuild of a foreign cache are timed.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from kiln.bench.stats import ROUNDS
from kiln.runtime.errors import ProviderMismatch
from kiln.runtime.manifest import Manifest, read_manifest
from kiln.runtime.package import load_package
from kiln.runtime.pipelines.feature_extraction import normalize, pool
from kiln.runtime.providers import cache_key, default_cache_dir
from kiln.runtime.session import SessionOptions
from kiln.runtime.tokenize import Batch, TextEncoder

TORCH_VARIANTS = ("fp32", "fp16", "compile")  # PyTorch eager fp32, eager fp16, torch.compile fp16
ACCURACY_BATCH = 32
Feeds = dict[str, np.ndarray]


@dataclass
class Engine:
    """One way of running the model: a function from host feeds to the host output."""

    name: str
    run: Callable[[Feeds], np.ndarray]
    max_length: int
    load_s: float = 0.0


def output_name(manifest: Manifest) -> str:
    return "logits" if manifest.task == "text-classification" else "last_hidden_state"


def package_engine(
    path: Path, provider: str | None, max_batch: int, cuda_graphs: bool = False, cache_dir: Path | None = None
) -> Engine:
    """A package on its provider (the one it was exported for unless `provider` says otherwise);
    `cuda_graphs`: captured and replayed per shape (kiln.runtime.cuda_graphs)."""
    manifest = read_manifest(path)
    chosen = provider or manifest.target
    start = time.perf_counter()
    options = SessionOptions(
        provider=chosen, max_batch=max_batch, allow_fp16_on_cpu=True, cuda_graphs=cuda_graphs, cache_dir=cache_dir
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProviderMismatch)  # a deliberate choice here: measured, not warned
        package = load_package(path, options)
    name = output_name(manifest)

    def run(feeds: Feeds) -> np.ndarray:
        return package.run(Batch(feeds, feeds["attention_mask"], []))[name]

    graphs = " + CUDA graphs" if cuda_graphs else ""
    engine = Engine(
        f"kiln {manifest.precision} ({manifest.target} graph) on {chosen}{graphs}", run, manifest.max_sequence_length
    )
    engine.run(_feeds(package.encoder, [[package.encoder.pad_id] * 8]))  # first run: engines are built here
    engine.load_s = time.perf_counter() - start
    return engine


def torch_engine(source: Path, manifest: Manifest, variant: str, device: str) -> Engine:
    import torch
    from kiln.export.tasks import torch_class

    dtype = torch.float32 if variant == "fp32" else torch.float16
    model = torch_class(manifest.task).from_pretrained(source, dtype=dtype).to(device).eval()
    forward = torch.compile(model, dynamic=True) if variant == "compile" else model
    name = output_name(manifest)

    def run(feeds: Feeds) -> np.ndarray:
        with torch.inference_mode():
            out = forward(**{k: torch.from_numpy(v).to(device) for k, v in feeds.items()})
        return getattr(out, name).float().cpu().numpy()

    label = {"fp32": "PyTorch eager fp32", "fp16": "PyTorch eager fp16", "compile": "torch.compile fp16"}[variant]
    return Engine(label, run, manifest.max_sequence_length)


def fixed_length_rows(encoder: TextEncoder, texts: list[str], length: int, rows: int) -> list[list[int]]:
    """`rows` token-id rows of exactly `length` tokens: consecutive corpus texts joined until long
    enough, then cut by the tokenizer's own truncation (special tokens kept)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(encoder.tokenizer.to_str())
    tokenizer.enable_truncation(length)
    out: list[list[int]] = []
    start = 0
    while len(out) < rows:
        joined, end = texts[start % len(texts)], start + 1
        while len(tokenizer.encode(joined).ids) < length and end - start < len(texts):
            joined += " " + texts[end % len(texts)]
            end += 1
        ids = tokenizer.encode(joined).ids
        if len(ids) < length:
            raise SystemExit(f"the corpus is too short to make rows of {length} tokens")
        out.append(ids)
        start = end
    return out


def _feeds(encoder: TextEncoder, rows: list[list[int]]) -> Feeds:
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), encoder.pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    available = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return {name: available[name] for name in encoder.input_names}


def time_cell(engines: list[Engine], feeds: Feeds, budget_s: float) -> dict[str, list[float]]:
    """Latencies (s) per engine on one input, engines taking turns for ROUNDS rounds."""
    runs: dict[str, int] = {}
    for engine in engines:
        for _ in range(3):  # warm-up: lazy allocation, kernel selection, torch.compile's shapes
            engine.run(feeds)
        start = time.perf_counter()
        engine.run(feeds)
        runs[engine.name] = int(np.clip(budget_s / ROUNDS / max(time.perf_counter() - start, 1e-5), 3, 200))
    latencies: dict[str, list[float]] = {engine.name: [] for engine in engines}
    for _ in range(ROUNDS):
        for engine in engines:
            for _ in range(runs[engine.name]):
                start = time.perf_counter()
                engine.run(feeds)
                latencies[engine.name].append(time.perf_counter() - start)
    return latencies


def grid(
    engines: list[Engine],
    encoder: TextEncoder,
    texts: list[str],
    batch_sizes: list[int],
    lengths: list[int],
    budget_s: float,
    progress: Any,
) -> list[dict[str, Any]]:
    rows = []
    for length in [n for n in lengths if n <= encoder.max_length]:  # longer than the model takes: no cell
        base = fixed_length_rows(encoder, texts, length, max(batch_sizes))
        for batch in batch_sizes:
            fit = [e for e in engines if length <= e.max_length]
            progress(f"gpu: batch {batch} x sequence {length}: {len(fit)} engines in {ROUNDS} alternating rounds")
            if not fit:
                continue
            latencies = time_cell(fit, _feeds(encoder, base[:batch]), budget_s)
            reference = np.median(latencies[fit[0].name])
            for engine in fit:
                ms = np.array(latencies[engine.name]) * 1000
                rows.append(
                    {
                        "engine": engine.name,
                        "batch": batch,
                        "length": length,
                        "p50_ms": float(np.median(ms)),
                        "p99_ms": float(np.percentile(ms, 99)),
                        "sequences_per_s": float(batch / np.mean(ms) * 1000),
                        "speedup_vs_first": float(reference / np.median(latencies[engine.name])),
                        "runs": len(ms),
                    }
                )
    return rows


def _pooled(output: np.ndarray, mask: np.ndarray, manifest: Manifest) -> np.ndarray:
    mode = manifest.pooling.mode if manifest.pooling else "mean"
    vectors = np.stack([pool(output[i, : int(mask[i].sum())], mode) for i in range(len(output))])
    return normalize(vectors) if manifest.pooling and manifest.pooling.normalize else vectors


def accuracy(
    engines: list[Engine], manifest: Manifest, encoder: TextEncoder, texts: list[str], max_length: int
) -> list[dict[str, Any]]:
    """Each engine against the first (PyTorch fp32) on the corpus, batches of 32 in corpus order;
    then one batch at `max_length` that must stay finite."""
    encodings = encoder.tokenize(texts)
    batches = [_feeds(encoder, [e.ids for e in encodings[i : i + ACCURACY_BATCH]]) for i in range(0, len(texts), 32)]
    longest = _feeds(encoder, fixed_length_rows(encoder, texts, max_length, 8))
    results: dict[str, np.ndarray] = {}
    rows = []
    for engine in engines:
        outputs = [engine.run(f) for f in batches]
        if manifest.task == "text-classification":
            results[engine.name] = np.concatenate(outputs)
        else:
            results[engine.name] = np.concatenate(
                [_pooled(o, f["attention_mask"], manifest) for o, f in zip(outputs, batches, strict=True)]
            )
        finite = bool(np.isfinite(engine.run(longest)).all()) if max_length <= engine.max_length else None
        figures = _against(results[engines[0].name], results[engine.name], manifest.task)
        rows.append({"engine": engine.name, "finite_at_max_length": finite, **figures})
    return rows


def _against(reference: np.ndarray, got: np.ndarray, task: str) -> dict[str, Any]:
    if not np.isfinite(got).all():
        return {"non_finite": int((~np.isfinite(got)).sum())}
    figures: dict[str, Any] = {"items": len(got), "max_abs_error": float(np.abs(reference - got).max())}
    if task == "text-classification":
        figures["agreement"] = float((reference.argmax(1) == got.argmax(1)).mean())
    else:
        cosines = (reference * got).sum(1) / np.linalg.norm(reference, axis=1) / np.linalg.norm(got, axis=1)
        figures["min_cosine"], figures["mean_cosine"] = float(cosines.min()), float(cosines.mean())
    return figures


def tensorrt_cache_timings(path: Path, max_batch: int, cache_dir: Path) -> dict[str, Any]:
    """Engine build from nothing, start with the cache, and start with a foreign cache (one keyed
    for another GPU): it must be rebuilt, never used."""
    import shutil

    cache_root = cache_dir / "tensorrt"
    key = cache_key(read_manifest(path))
    shutil.rmtree(cache_root / key.digest, ignore_errors=True)
    cold = package_engine(path, "tensorrt", max_batch, cache_dir=cache_dir).load_s
    engines = sorted(str(p.relative_to(cache_root)) for p in (cache_root / key.digest).rglob("*") if p.is_file())
    warm = package_engine(path, "tensorrt", max_batch, cache_dir=cache_dir).load_s
    marker = cache_root / key.digest / "key.json"
    marker.write_text(json.dumps({**asdict(key), "gpu": "another GPU"}))
    foreign = package_engine(path, "tensorrt", max_batch, cache_dir=cache_dir).load_s
    rebuilt = json.loads(marker.read_text()) == asdict(key)
    return {
        "build_s": cold,
        "start_with_cache_s": warm,
        "start_with_foreign_cache_s": foreign,
        "foreign_cache_rebuilt": rebuilt,
        "cache_files": engines,
    }


def bench_gpu(
    packages: list[Path],
    source: Path,
    texts: list[str],
    provider: str | None,
    batch_sizes: list[int],
    lengths: list[int],
    torch_variants: list[str],
    budget_s: float,
    progress: Any,
) -> dict[str, Any]:
    manifest = read_manifest(packages[0])
    device = _torch_device()
    progress(f"gpu: loading PyTorch ({', '.join(torch_variants)}) on {device} and {len(packages)} packages")
    engines: list[Engine] = []
    failed: dict[str, str] = {}
    for variant in sorted(torch_variants, key=lambda v: v != "fp32"):  # the reference first
        if variant not in TORCH_VARIANTS or (variant != "fp32" and device == "cpu"):
            failed[f"PyTorch {variant}"] = "not run: fp16 and torch.compile are measured on a GPU only"
            continue
        engines.append(torch_engine(source, manifest, variant, device))
    if not engines or engines[0].name != "PyTorch eager fp32":
        raise SystemExit("kiln bench gpu needs PyTorch fp32 (--torch fp32,...) as the reference")
    trt_cache = {}
    for path in packages:
        chosen = provider or read_manifest(path).target
        try:
            if chosen == "tensorrt":
                trt_cache[str(path)] = tensorrt_cache_timings(path, max(batch_sizes), default_cache_dir())
            engines.append(package_engine(path, provider, max(batch_sizes)))
            if chosen == "cuda":  # the same package replaying captured CUDA graphs, side by side
                engines.append(package_engine(path, provider, max(batch_sizes), cuda_graphs=True))
        except Exception as exc:  # a provider that cannot start here is a result, not a crash
            failed[str(path)] = f"{type(exc).__name__}: {exc}"
    encoder = TextEncoder.from_directory(packages[0], manifest.inputs, manifest.max_sequence_length)
    engines = _compiled_or_dropped(engines, _feeds(encoder, [[encoder.pad_id] * 16]), failed)
    progress("gpu: accuracy on the corpus against PyTorch fp32, and a batch at the longest length")
    longest = min(max(lengths), max(e.max_length for e in engines))
    results = {
        "gpu": _gpu_name(),
        "task": manifest.task,
        "texts": len(texts),
        "provider": provider or "each package's target",
        "load_s": {e.name: e.load_s for e in engines if e.load_s},
        "accuracy": accuracy(engines, manifest, encoder, texts, longest),
        "grid": grid(engines, encoder, texts, batch_sizes, lengths, budget_s, progress),
        "tensorrt_cache": trt_cache,
        "not_run": failed,
    }
    results["verdicts"] = verdicts(results)
    return results


def _compiled_or_dropped(engines: list[Engine], feeds: Feeds, failed: dict[str, str]) -> list[Engine]:
    """torch.compile compiles at its first call; one that cannot compile here is reported, not fatal."""
    kept = []
    for engine in engines:
        try:
            engine.run(feeds)
            kept.append(engine)
        except Exception as exc:
            failed[engine.name] = f"{type(exc).__name__}: {str(exc)[:500]}"
    return kept


def verdicts(results: dict[str, Any]) -> list[str]:
    """The issue's targets: TensorRT fp16 >= 5x PyTorch fp32 eager at batch 1, sequence 128, with
    >= 99.5% agreement; where no TensorRT engine ran, the best kiln engine is reported against it."""
    out = []
    cell = {(r["engine"], r["batch"], r["length"]): r for r in results["grid"]}
    for acc in results["accuracy"]:
        name = acc["engine"]
        if not name.startswith("kiln") or (name, 1, 128) not in cell:
            continue
        ratio = cell[(name, 1, 128)]["speedup_vs_first"]
        score = acc.get("agreement", acc.get("min_cosine"))
        ok = ratio >= 5 and score is not None and score >= 0.995
        out.append(
            f"{name}: {ratio:.2f}x PyTorch fp32 eager at batch 1 x 128, agreement/cosine {score} "
            f"({'MET' if ok else 'SHORT'} of 5x with >= 0.995)"
        )
    return out


def _torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _gpu_name() -> str:
    from kiln.runtime.providers import gpu_name

    return gpu_name()


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"## GPU table: {results['task']}, {results['gpu']}",
        "",
        "| engine | batch | sequence | p50 ms | p99 ms | sequences/s | vs PyTorch fp32 eager |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["grid"]:
        lines.append(
            f"| {r['engine']} | {r['batch']} | {r['length']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
            f"| {r['sequences_per_s']:.0f} | {r['speedup_vs_first']:.2f}x |"
        )
    lines += ["", f"Accuracy against PyTorch fp32 eager on {results['texts']} corpus texts (batches of 32):", ""]
    lines += [
        "| engine | agreement | min cosine | max abs error | finite at the longest length |",
        "|---|---:|---:|---:|---|",
    ]
    for a in results["accuracy"]:
        lines.append(
            f"| {a['engine']} | {_num(a.get('agreement'))} | {_num(a.get('min_cosine'))} "
            f"| {_num(a.get('max_abs_error'))} | {a.get('finite_at_max_length')} |"
        )
    for path, t in results["tensorrt_cache"].items():
        lines.append(
            f"- TensorRT {path}: engine build {t['build_s']:.1f} s, start with cache {t['start_with_cache_s']:.1f} s, "
            f"with a foreign cache {t['start_with_foreign_cache_s']:.1f} s (rebuilt: {t['foreign_cache_rebuilt']})"
        )
    for name, why in results["not_run"].items():
        lines.append(f"- not run: {name}: {why}")
    lines += [f"- {v}" for v in results["verdicts"]]
    return "\n".join(lines) + "\n"


def _num(value: Any) -> str:
    return "—" if value is None else f"{value:.4f}"


def plot(results: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in results["grid"]})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.5 * len(lengths), 4), squeeze=False)
    for ax, length in zip(axes[0], lengths, strict=True):
        for engine in dict.fromkeys(r["engine"] for r in results["grid"]):
            rows = [r for r in results["grid"] if r["engine"] == engine and r["length"] == length]
            ax.plot([r["batch"] for r in rows], [r["sequences_per_s"] for r in rows], marker="o", label=engine)
        ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="sequences/s", title=f"sequence {length}")
        ax.legend(fontsize=6)
    fig.suptitle(f"{results['task']} on {results['gpu']}")
    fig.tight_layout()
    path = out / "gpu.png"
    fig.savefig(path, dpi=110)
    return path
