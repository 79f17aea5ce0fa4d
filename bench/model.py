"""`kiln bench model`: PyTorch eager, ONNX fp32 and the package, side by side in one run.

Each engine gets the same corpus texts in corpus order (real traffic is not sorted), at each batch
size; beside the speed, each ONNX engine's agreement with PyTorch on exactly those texts. The
engines take turns, ROUNDS times over a share of the batches each, so this machine's drift (often
+-30% within minutes) does not favour whichever engine ran in a fast minute.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from kiln.bench.stats import ROUNDS, Timing
from kiln.runtime import pipeline
from kiln.runtime.manifest import read_manifest


def _chunks(texts: list[str], size: int) -> list[list[str]]:
    return [texts[i : i + size] for i in range(0, len(texts), size)]


@dataclass
class _Measured:
    latencies: list[float] = field(default_factory=list)
    wall: float = 0.0
    outputs: dict[int, Any] = field(default_factory=dict)  # by batch index


def _time_rounds(engines: dict[str, Any], batches: list[list[str]]) -> dict[str, _Measured]:
    """Every engine over every batch, taking turns by round; outputs kept by batch index."""
    measured = {name: _Measured() for name in engines}
    for run in engines.values():
        run(batches[0])  # warm-up
    for r in range(ROUNDS):
        indices = range(r, len(batches), ROUNDS)
        for name, run in engines.items():
            start = time.perf_counter()
            for i in indices:
                t = time.perf_counter()
                measured[name].outputs[i] = run(batches[i])
                measured[name].latencies.append(time.perf_counter() - t)
            measured[name].wall += time.perf_counter() - start
    return measured


def torch_engine(source: Path, task: str, max_length: int, pooling: Any, device: str = "cpu") -> Any:
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(max(1, torch.get_num_threads()))
    tokenizer = AutoTokenizer.from_pretrained(source)
    cls = AutoModelForSequenceClassification if task == "text-classification" else AutoModel
    model = cls.from_pretrained(source).to(device).eval()

    def run(batch: list[str]) -> np.ndarray:
        encoded = tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.inference_mode():
            out = model(**encoded.to(device))
        if task == "text-classification":
            return out.logits.cpu().numpy()
        mask = encoded["attention_mask"].unsqueeze(-1).float()
        vectors = ((out.last_hidden_state * mask).sum(1) / mask.sum(1)).cpu().numpy()
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True) if pooling.normalize else vectors

    return run


def optimum_int8_engine(source: Path, task: str, max_length: int, pooling: Any, work: Path) -> Any:
    """What a user of optimum would run for int8: the model exported by optimum, quantised with
    optimum's default dynamic int8 for this CPU (ORTQuantizer with avx512_vnni, per-channel, not
    static) and run through its ORTModel. Built once per bench run, in `work`."""
    from optimum.onnxruntime import (
        ORTModelForFeatureExtraction,
        ORTModelForSequenceClassification,
        ORTQuantizer,
    )
    from optimum.onnxruntime.configuration import AutoQuantizationConfig
    from transformers import AutoTokenizer

    cls = ORTModelForSequenceClassification if task == "text-classification" else ORTModelForFeatureExtraction
    quantized = work / "optimum-int8"
    if not (quantized / "model_quantized.onnx").is_file():
        cls.from_pretrained(source, export=True).save_pretrained(work / "optimum-fp32")
        quantizer = ORTQuantizer.from_pretrained(work / "optimum-fp32")
        config = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True)
        quantizer.quantize(save_dir=quantized, quantization_config=config)
    model = cls.from_pretrained(quantized, file_name="model_quantized.onnx")
    tokenizer = AutoTokenizer.from_pretrained(source)

    def run(batch: list[str]) -> np.ndarray:
        encoded = tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="np")
        out = model(**encoded)
        if task == "text-classification":
            return np.asarray(out.logits)
        mask = encoded["attention_mask"][..., None].astype(np.float32)
        vectors = (np.asarray(out.last_hidden_state) * mask).sum(1) / mask.sum(1)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True) if pooling.normalize else vectors

    return run


def kiln_engine(package: Path, batch_size: int, provider: str = "cpu") -> Any:
    pipe = pipeline(package, batch_size=batch_size, provider=provider)
    if pipe.task == "text-classification":
        return lambda batch: pipe.logits(batch)[0]
    return lambda batch: pipe(batch)


def accuracy(task: str, reference: np.ndarray, got: np.ndarray) -> dict[str, float]:
    if task == "text-classification":
        return {
            "agreement": float((reference.argmax(1) == got.argmax(1)).mean()),
            "max_abs_error": float(np.abs(reference - got).max()),
        }
    cos = (reference * got).sum(1) / np.linalg.norm(reference, axis=1) / np.linalg.norm(got, axis=1)
    return {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}


def bench_model(
    package: Path,
    source: Path,
    fp32: Path | None,
    texts: list[str],
    batch_sizes: list[int],
    progress: Any,
    provider: str = "cpu",
    length_grouped: bool = False,
    beside: tuple[Path, ...] = (),
) -> dict[str, Any]:
    """On a GPU provider PyTorch runs on the GPU too (fp32 eager, the reference). `length_grouped`
    orders the texts by length first, so batches hold texts of similar length, as a busy server's
    batcher forms them; every engine gets the same batches either way. `beside`: other packages of
    the same model (another precision, int8 for other CPUs), in the same rounds, named
    kiln:<directory>."""
    manifest = read_manifest(package)
    if manifest.task not in ("text-classification", "feature-extraction"):
        raise SystemExit(f"kiln bench model measures text-classification and feature-extraction, not {manifest.task}")
    engines: dict[str, Path | None] = {"pytorch-eager": None, **({"onnx-fp32": fp32} if fp32 else {})}
    if manifest.precision.startswith("int8") and provider == "cpu":
        engines["optimum-int8"] = None  # the int8 a user of optimum would otherwise run
    engines[f"kiln-{manifest.precision}"] = package
    engines.update({f"kiln:{other.name}": other for other in beside})
    device = "cpu" if provider == "cpu" else "cuda"
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    encoder = pipeline(package, allow_fp16_on_cpu=True).encoder
    lengths = [len(e.ids) for e in encoder.tokenize(texts)]
    if length_grouped:
        texts = [text for _, text in sorted(zip(lengths, texts, strict=True), key=lambda pair: pair[0])]
    tokens = sum(lengths)
    timings, accuracies = [], []
    for size in batch_sizes:
        batches = _chunks(texts, size)
        progress(f"model: {', '.join(engines)} at batch {size}, in {ROUNDS} alternating rounds")
        runs = {
            name: _engine(name, path, source, manifest, size, provider, device, work) for name, path in engines.items()
        }
        measured = _time_rounds(runs, batches)
        reference = None
        for name, m in measured.items():
            values = np.concatenate([m.outputs[i] for i in range(len(batches))])
            timings.append(Timing.of(name, f"batch {size}", m.latencies, m.wall, len(texts), tokens).row())
            if reference is None:
                reference = values
            else:
                accuracies.append(
                    {"engine": name, "setting": f"batch {size}", **accuracy(manifest.task, reference, values)}
                )
    shutil.rmtree(work, ignore_errors=True)
    return {
        "task": manifest.task,
        "precision": manifest.precision,
        "texts": len(texts),
        "tokens": tokens,
        "length_grouped": length_grouped,
        "timings": timings,
        "accuracy": accuracies,
    }


def _engine(
    name: str, path: Path | None, source: Path, manifest: Any, size: int, provider: str, device: str, work: Path
) -> Any:
    if name == "pytorch-eager":
        return torch_engine(source, manifest.task, manifest.max_sequence_length, manifest.pooling, device)
    if name == "optimum-int8":
        return optimum_int8_engine(source, manifest.task, manifest.max_sequence_length, manifest.pooling, work)
    return kiln_engine(path, size, provider)
