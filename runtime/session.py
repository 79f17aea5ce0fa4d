"""onnxruntime sessions: provider choice and CPU threading, with no silent fallback."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from kiln.runtime.errors import MissingDependency, PackageError, ProviderUnavailable
from kiln.runtime.native import kernels_library

try:
    import onnxruntime as ort
except ImportError as exc:  # neither onnxruntime nor onnxruntime-gpu: the install chose no extra
    raise MissingDependency(
        "kiln needs onnxruntime: pip install 'kiln-serve[cpu]' (or 'kiln-serve[gpu]' on a machine with a GPU)"
    ) from exc

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
_AUTO_ORDER = ("tensorrt", "cuda", "cpu")


@dataclass
class SessionOptions:
    provider: str = "cpu"  # cpu | cuda | tensorrt | auto
    intra_op_threads: int = 0  # 0: one per physical core (onnxruntime's default)
    inter_op_threads: int = 1
    allow_fallback: bool = False
    # onnxruntime's pool threads busy-wait between ops by default: fastest for one caller
    spin: bool = True
    # ...and, by default, for tens of ms after each run (measured here: ~46 ms of CPU burnt after a
    # 3 ms run). A server bounds it, so the cores go back to gRPC, tokenization and other instances.
    # None: onnxruntime's default.
    spin_after_us: int | None = None
    max_batch: int = 64  # the largest batch a GPU shape profile must cover
    allow_fp16_on_cpu: bool = False  # fp16 graphs run on CPU only through slow casts; refuse unless asked
    cache_dir: Path | None = None  # TensorRT engines and timing caches (None: providers.default_cache_dir)
    # generators: keep the KV cache where the session made it between decoding steps (IO binding);
    # None: on a GPU yes, on CPU no (there the cache is in host memory anyway; True there checks the path)
    kv_on_device: bool | None = None
    cuda_graphs: bool = False  # encoders on CUDA: capture and replay a CUDA graph per shape (kiln.runtime.cuda_graphs)
    # on CPU, kiln's own kernels where the wheel has them (kiln.runtime.native): the same bits as the
    # standard ops they replace; False runs those standard ops, to compare
    native_kernels: bool = True
    optimized_model_path: Path | None = None  # write the graph as onnxruntime optimised it, to see what runs


def resolve_provider(name: str) -> str:
    """Map a user-facing provider name to onnxruntime's, refusing one this build lacks."""
    available = ort.get_available_providers()
    if name == "auto":
        return next(PROVIDERS[p] for p in _AUTO_ORDER if PROVIDERS[p] in available)
    if name not in PROVIDERS:
        raise ProviderUnavailable(f"unknown provider {name!r}; choose one of auto, {', '.join(PROVIDERS)}")
    if PROVIDERS[name] not in available:
        raise ProviderUnavailable(
            f"provider {name!r} is not available in this onnxruntime build ({ort.__version__}; "
            f"available: {', '.join(available)}); install kiln-serve[gpu] (instead of [cpu]) on a machine "
            "with a GPU, or use cpu"
        )
    return PROVIDERS[name]


def provider_available(name: str) -> bool:
    """Whether this onnxruntime build offers the provider (not whether a GPU is present)."""
    return name in PROVIDERS and PROVIDERS[name] in ort.get_available_providers()


def create_session(
    model_path: Path, options: SessionOptions, provider_options: dict | None = None
) -> ort.InferenceSession:
    """A session on the chosen provider. For TensorRT, CUDA runs the nodes TensorRT cannot take
    (graph partitioning); CPU is added only when `allow_fallback` asks for it."""
    provider = resolve_provider(options.provider)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = options.intra_op_threads or cpu_count()
    so.inter_op_num_threads = options.inter_op_threads
    so.log_severity_level = 3
    if options.optimized_model_path is not None:
        so.optimized_model_filepath = str(options.optimized_model_path)
    if not options.spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    elif options.spin_after_us is not None:
        so.add_session_config_entry("session.intra_op.spin_duration_us", str(options.spin_after_us))
    if provider != PROVIDERS["cpu"] and hasattr(ort, "preload_dlls"):
        # CUDA and cuDNN from the nvidia-* wheels beside onnxruntime-gpu, found without LD_LIBRARY_PATH
        # (the serving install has no torch to have loaded them first)
        ort.preload_dlls()
    library = kernels_library() if options.native_kernels and provider == PROVIDERS["cpu"] else None
    if library is not None:
        so.register_custom_ops_library(str(library))
    providers: list = [(provider, provider_options or {})]
    if provider == PROVIDERS["tensorrt"]:
        providers.append(PROVIDERS["cuda"])
    if options.allow_fallback and provider != PROVIDERS["cpu"]:
        providers.append(PROVIDERS["cpu"])
    # onnxruntime's CPU SkipLayerNormalization is 4x slower than the Add and LayerNormalization it
    # would fuse (kiln.export.optimize): leave them apart on CPU
    unfused = ["SkipLayerNormFusion"] if provider == PROVIDERS["cpu"] else []
    try:
        session = ort.InferenceSession(str(model_path), so, providers=providers, disabled_optimizers=unfused)
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise PackageError(f"{model_path}: onnxruntime {ort.__version__} cannot load this model: {exc}") from exc
    if provider not in session.get_providers():
        # onnxruntime drops a provider whose libraries it cannot load (TensorRT without libnvinfer,
        # CUDA without cuDNN) and carries on with the rest: kiln refuses rather than run elsewhere
        raise ProviderUnavailable(
            f"onnxruntime could not start {provider} (its libraries are missing or do not match this GPU); "
            f"the session would have run on {', '.join(session.get_providers())}"
        )
    return session


def cpu_count(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """Cores this process may use: its affinity, or the container's CPU quota where that is lower
    (a pod limited to 2 CPUs on a 64-core node must not start 64 threads and 64 instances)."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root)
    return max(1, min(affinity, math.ceil(quota)) if quota else affinity)


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup CPU quota (v2 `cpu.max`, else v1 `cfs_quota_us / cfs_period_us`),
    None where there is no quota."""
    v2 = root / "cpu.max"
    try:
        if v2.is_file():
            quota, _, period = v2.read_text().strip().partition(" ")
            return None if quota == "max" else int(quota) / int(period or 100000)
        for v1 in (root / "cpu", root / "cpu,cpuacct", root):
            quota_file, period_file = v1 / "cpu.cfs_quota_us", v1 / "cpu.cfs_period_us"
            if quota_file.is_file() and period_file.is_file():
                quota = int(quota_file.read_text())
                return None if quota <= 0 else quota / int(period_file.read_text())
    except (OSError, ValueError):  # unreadable or odd: no quota known, the affinity decides
        return None
    return None


def cache_device(options: SessionOptions) -> str | None:
    """Where a generator's KV cache stays between steps (None: it goes through numpy every step)."""
    on_gpu = resolve_provider(options.provider) != PROVIDERS["cpu"]
    if options.kv_on_device is False or (options.kv_on_device is None and not on_gpu):
        return None
    return "cuda" if on_gpu else "cpu"
