"""GPU provider configuration, checked on any machine; the GPU runs themselves skip without one."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from kiln.runtime.manifest import read_manifest
from kiln.runtime.providers import (
    CacheKey,
    ShapeProfile,
    bucketed,
    default_cache_dir,
    output_shape,
    tensorrt_cache,
    tensorrt_options,
)

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
HAS_TENSORRT = "TensorrtExecutionProvider" in ort.get_available_providers()


def test_profile_shapes_cover_batch_and_length():
    profile = ShapeProfile(max_batch=64, max_length=512, opt_batch=8, opt_length=128)
    names = ["input_ids", "attention_mask"]
    assert profile.shapes(names, "min") == "input_ids:1x1,attention_mask:1x1"
    assert profile.shapes(names, "opt") == "input_ids:8x128,attention_mask:8x128"
    assert profile.shapes(names, "max") == "input_ids:64x512,attention_mask:64x512"
    assert ShapeProfile(max_batch=4, max_length=64).shapes(names[:1], "opt") == "input_ids:4x64"


def test_cache_key_changes_with_gpu_tensorrt_and_model():
    base = CacheKey("NVIDIA H100", "10.4.0", "abc")
    assert base.digest == CacheKey("NVIDIA H100", "10.4.0", "abc").digest
    for other in (
        CacheKey("NVIDIA A10", "10.4.0", "abc"),
        CacheKey("NVIDIA H100", "10.5.0", "abc"),
        CacheKey("NVIDIA H100", "10.4.0", "abd"),
    ):
        assert other.digest != base.digest


def test_foreign_cache_is_rebuilt_not_used(exported, tmp_path):
    manifest = read_manifest(exported("bert", "text-classification"))
    key = CacheKey("NVIDIA H100", "10.4.0", manifest.files["model.onnx"])
    directory = tensorrt_cache(tmp_path, key)
    (directory / "engine.bin").write_bytes(b"engine")
    assert tensorrt_cache(tmp_path, key) == directory and (directory / "engine.bin").exists()
    (directory / "key.json").write_text(json.dumps({"gpu": "other", "tensorrt": "x", "model_sha256": "y"}))
    rebuilt = tensorrt_cache(tmp_path, key)
    assert rebuilt == directory and not (directory / "engine.bin").exists()
    assert json.loads((directory / "key.json").read_text())["gpu"] == "NVIDIA H100"


def _files(directory) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*")}


def test_tensorrt_options(exported, tmp_path):
    package = exported("bert", "text-classification")
    before = _files(package)
    manifest = read_manifest(package)
    key = CacheKey("gpu", "trt", manifest.files["model.onnx"])
    options = tensorrt_options(tmp_path, manifest, manifest.inputs, ShapeProfile(32, bucketed(128)), key)
    assert options["trt_engine_cache_enable"] and options["trt_engine_cache_path"].endswith(key.digest)
    assert options["trt_engine_cache_path"].startswith(str(tmp_path)) and _files(package) == before  # package only read
    assert options["trt_profile_max_shapes"].startswith("input_ids:32x128")
    # an fp32 package stays fp32 on TensorRT; fp16 kernels only where the package was validated in fp16
    assert options["trt_fp16_enable"] is False and options["trt_int8_enable"] is False
    for precision, fp16, int8 in (("fp16", True, False), ("int8-static", True, True)):
        manifest.precision = precision
        options = tensorrt_options(tmp_path, manifest, manifest.inputs, ShapeProfile(32, bucketed(128)), key)
        assert (options["trt_fp16_enable"], options["trt_int8_enable"]) == (fp16, int8)


def test_output_shapes_and_buckets():
    assert bucketed(1) == 16 and bucketed(16) == 16 and bucketed(17) == 32
    assert output_shape(["batch_size", "sequence_length", 384], "batch_size", "sequence_length", 4, 32) == (4, 32, 384)
    assert output_shape(["batch_size", 7], "batch_size", "sequence_length", 4, 32) == (4, 7)
    with pytest.raises(ValueError, match="cannot size"):
        output_shape(["mystery"], "batch_size", "sequence_length", 1, 1)


def test_gpu_padding_to_buckets_does_not_change_answers(exported):
    """GPU runs pad to multiples of 16; checked on CPU, where the same code path can run."""
    from kiln.runtime import load_package, pipeline

    package = load_package(exported("bert", "token-classification"))
    plain = pipeline(package)(["Alice lives in Seoul"])
    package.encoder.pad_multiple = 16
    assert package.encoder.pad(package.encoder.tokenize(["Alice"])).feeds["input_ids"].shape[1] == 16
    assert pipeline(package)(["Alice lives in Seoul"]) == plain


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a CUDA GPU")
def test_cuda_matches_cpu(exported):
    from kiln.runtime import pipeline

    texts = ["Alice lives in Seoul", "a somewhat longer sentence about rates"]
    cpu, _ = pipeline(exported("bert", "text-classification")).logits(texts)
    gpu, _ = pipeline(exported("bert", "text-classification"), provider="cuda").logits(texts)
    assert np.abs(cpu - gpu).max() < 1e-3


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a CUDA GPU")
def test_cuda_graphs_replay_what_the_plain_cuda_run_gives(exported):
    from kiln.runtime import SessionOptions, load_package
    from kiln.runtime.cuda_graphs import CudaGraphs

    path = exported("bert", "text-classification")
    plain = load_package(path, SessionOptions(provider="cuda"))
    graphed = load_package(path, SessionOptions(provider="cuda", cuda_graphs=True))
    assert isinstance(graphed.binding, CudaGraphs)
    for _ in range(3):  # the first run of a shape captures its graph, the next ones replay it
        for text in ("Alice lives in Seoul", "a somewhat longer sentence about rates", "short"):
            batch = plain.encoder.pad(plain.encoder.tokenize([text]))
            assert np.abs(graphed.run(batch)["logits"] - plain.run(batch)["logits"]).max() < 1e-4


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a CUDA GPU")
def test_a_generator_on_cuda_keeps_its_cache_on_the_device(generator_package):
    from kiln.runtime import SessionOptions, pipeline
    from kiln.runtime.generation.package import load_generator

    package = generator_package("gpt2")
    generator = load_generator(package, SessionOptions(provider="cuda"))
    prompts = [generator.tokenize(text, False)[0] for text in ("Stocks rally as", "Heavy rain floods")]
    logits, cache = generator.decoder.prefill(prompts)
    _, cache = generator.decoder.step(cache, logits.argmax(axis=1))
    assert {value.device_name() for value in cache.past.values()} == {"cuda"}
    greedy = {"max_new_tokens": 16, "do_sample": False}
    texts = ["Stocks rally as", "Heavy rain floods"]
    assert pipeline(package, provider="cuda")(texts, **greedy) == pipeline(package)(texts, **greedy)


@pytest.mark.skipif(not HAS_TENSORRT, reason="needs TensorRT and a GPU")
def test_tensorrt_builds_and_caches_outside_the_package(exported, tmp_path):
    from kiln.runtime import SessionOptions, load_package

    package = exported("bert", "text-classification")
    load_package(package, SessionOptions(provider="tensorrt", cache_dir=tmp_path))
    assert any((tmp_path / "tensorrt").rglob("*.engine")) and not (package / "cache").exists()


def test_cpu_count_follows_the_cgroup_quota(tmp_path):
    """A pod limited to 1.5 CPUs gets 2 threads and instances, whatever the node has."""
    from kiln.runtime.session import cgroup_cpu_quota, cpu_count

    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(v2) == 1.5 and cpu_count(v2) == min(2, len(__import__("os").sched_getaffinity(0)))
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(v2) is None
    v1 = tmp_path / "v1" / "cpu,cpuacct"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(tmp_path / "v1") == 1.0 and cpu_count(tmp_path / "v1") == 1
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(tmp_path / "v1") is None
    assert cgroup_cpu_quota(tmp_path / "none") is None


def test_the_default_cache_dir_falls_back_to_the_temporary_directory(tmp_path, monkeypatch):
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the user's cache would be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    assert default_cache_dir() == tmp_path / "tmp" / "kiln-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache" / "kiln"
