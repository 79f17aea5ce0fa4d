"""GPU execution: TensorRT profiles and caches, CUDA IO binding.

TensorRT builds one engine per shape profile; kiln derives explicit min/opt/max shapes from the
package's maximum length and the server's batch limits, and caches engines and timing data in
`<cache dir>/tensorrt/<key>/`, where the key hashes the GPU model, the TensorRT version and the
model file, so packages can share one cache dir and a cache built for anything else is never
found, so never trusted; it is rebuilt. Nothing is ever written into a package: it may be mounted
read-only (as deploy/kubernetes mounts /models). The cache dir is `--cache-dir`, else the user's
cache (`$XDG_CACHE_HOME/kiln`, `~/.cache/kiln`), else the temporary directory's `kiln-cache`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from kiln.runtime.errors import ConfigError
from kiln.runtime.manifest import MODEL_NAME, Manifest

LENGTH_BUCKET = 16  # GPU batches are padded to a multiple of this, so buffers and engines are reused


@dataclass(frozen=True)
class ShapeProfile:
    """The batch and sequence-length range one TensorRT engine covers."""

    max_batch: int
    max_length: int
    opt_batch: int = 8
    opt_length: int = 128

    def shapes(self, inputs: list[str], which: str) -> str:
        batch, length = {
            "min": (1, 1),
            "opt": (min(self.opt_batch, self.max_batch), min(self.opt_length, self.max_length)),
            "max": (self.max_batch, self.max_length),
        }[which]
        return ",".join(f"{name}:{batch}x{length}" for name in inputs)


@dataclass(frozen=True)
class CacheKey:
    gpu: str
    tensorrt: str
    model_sha256: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def gpu_name() -> str:
    """The first GPU's model name from nvidia-smi, or 'unknown-gpu'."""
    if shutil.which("nvidia-smi") is None:
        return "unknown-gpu"
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip().splitlines()[0] or "unknown-gpu"
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown-gpu"


def tensorrt_version() -> str:
    try:
        import tensorrt

        return str(tensorrt.__version__)
    except ImportError:
        return "unknown-tensorrt"


def default_cache_dir() -> Path:
    """The first of the user's cache and the temporary directory that can be written (a container
    with a read-only root often has only /tmp)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    for candidate in (Path(base) / "kiln", Path(tempfile.gettempdir()) / "kiln-cache"):
        try:
            candidate.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(candidate, os.W_OK):
            return candidate
    raise ConfigError(
        "no writable cache directory (tried the user's cache and the temporary directory): give --cache-dir"
    )


def tensorrt_cache(cache_dir: Path, key: CacheKey) -> Path:
    """The cache directory for exactly this GPU, TensorRT and model; written with its key so a
    person can see what it was built for."""
    directory = cache_dir / "tensorrt" / key.digest
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / "key.json"
    if marker.is_file() and json.loads(marker.read_text()) != asdict(key):
        shutil.rmtree(directory)  # a hash collision or a hand-edited cache: rebuild, never reuse
        directory.mkdir(parents=True)
    marker.write_text(json.dumps(asdict(key), indent=2))
    return directory


def tensorrt_options(
    cache_dir: Path, manifest: Manifest, inputs: list[str], profile: ShapeProfile, key: CacheKey
) -> dict[str, Any]:
    cache = tensorrt_cache(cache_dir, key)
    return {
        # an fp32 package runs in fp32: fp16 kernels only where the package was validated in fp16, and
        # beside int8 for the layers explicit Q/DQ leaves in float
        "trt_fp16_enable": manifest.precision in ("fp16", "int8-static"),
        "trt_int8_enable": manifest.precision == "int8-static",
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache),
        "trt_profile_min_shapes": profile.shapes(inputs, "min"),
        "trt_profile_opt_shapes": profile.shapes(inputs, "opt"),
        "trt_profile_max_shapes": profile.shapes(inputs, "max"),
        "trt_builder_optimization_level": 3,
    }


def cache_key(manifest: Manifest) -> CacheKey:
    return CacheKey(gpu_name(), tensorrt_version(), manifest.files.get(MODEL_NAME, "unhashed"))


def bucketed(length: int) -> int:
    return -(-length // LENGTH_BUCKET) * LENGTH_BUCKET


def output_shape(symbolic: list[Any], batch_dim: str, length_dim: str, batch: int, length: int) -> tuple[int, ...]:
    """Concrete output shape from onnxruntime's symbolic one (names shared with the inputs)."""
    shape = []
    for dim in symbolic:
        if isinstance(dim, int):
            shape.append(dim)
        elif dim == batch_dim:
            shape.append(batch)
        elif dim == length_dim:
            shape.append(length)
        else:
            raise ValueError(f"cannot size output dimension {dim!r}")
    return tuple(shape)


class CudaBinding:
    """Runs a CUDA session through IO binding, output buffers allocated once per shape bucket."""

    def __init__(self, session: Any, outputs: list[str]):
        import onnxruntime as ort

        self._ort = ort
        self.session = session
        self.outputs = outputs
        first = session.get_inputs()[0].shape
        self._batch_dim, self._length_dim = first[0], first[1]
        self._shapes = {o.name: o.shape for o in session.get_outputs()}
        self._buffers: dict[tuple[int, int], dict[str, Any]] = {}

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        batch, length = next(iter(feeds.values())).shape
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        buffers = self._output_buffers(batch, length)
        if buffers is None:  # output shapes the graph does not tie to its inputs: onnxruntime allocates
            for name in self.outputs:
                binding.bind_output(name, "cuda")
            self.session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()
        for name, value in buffers.items():
            binding.bind_ortvalue_output(name, value)
        self.session.run_with_iobinding(binding)
        return [buffers[name].numpy() for name in self.outputs]

    def _output_buffers(self, batch: int, length: int) -> dict[str, Any] | None:
        key = (batch, length)
        if key not in self._buffers:
            try:
                shapes = {
                    name: output_shape(self._shapes[name], self._batch_dim, self._length_dim, batch, length)
                    for name in self.outputs
                }
            except ValueError:
                return None
            self._buffers[key] = {
                name: self._ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, "cuda", 0)
                for name, shape in shapes.items()
            }
        return self._buffers[key]
