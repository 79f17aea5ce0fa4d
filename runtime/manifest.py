"""kiln.json: the manifest that describes a package, shared by the writer (export) and the loader."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.runtime.errors import PackageError

FORMAT_VERSION = 1
MANIFEST_NAME = "kiln.json"
MODEL_NAME = "model.onnx"

PRECISIONS = ("fp32", "fp16", "int8-dynamic", "int8-static")
TARGETS = ("cpu", "cuda", "tensorrt")  # the execution provider a package's graph is shaped for


@dataclass
class Pooling:
    """How token embeddings become one sentence embedding (feature-extraction only)."""

    mode: str = "mean"  # mean | cls | max
    normalize: bool = False


@dataclass
class Manifest:
    task: str
    precision: str
    inputs: list[str]
    outputs: list[str]
    max_sequence_length: int
    labels: list[str] = field(default_factory=list)
    problem_type: str | None = None
    model_type: str = ""
    opset: int = 17
    target: str = "cpu"
    pooling: Pooling | None = None
    mask_token: str | None = None
    # 1: run one text per session call. kiln's int8 kernels round a row slightly differently
    # depending on how many rows share the call (~1e-6, then amplified by int8 rounding), so only
    # one text per call makes answers exactly independent of batch-mates. 0: any batch size.
    max_batch_size: int = 0
    quantization: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    tools: dict[str, str] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        if kwargs.get("pooling") is not None:
            kwargs["pooling"] = Pooling(**kwargs["pooling"])
        return cls(**kwargs)

    def write(self, directory: Path) -> None:
        text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False)
        (directory / MANIFEST_NAME).write_text(text + "\n", encoding="utf-8")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(directory: Path) -> Manifest:
    """Parse and validate kiln.json; the errors name the file and what is wrong with it."""
    path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise PackageError(f"{directory}: not a directory; a kiln package is a directory with {MANIFEST_NAME}")
    if not path.is_file():
        raise PackageError(f"{directory}: no {MANIFEST_NAME}; is this a package written by `kiln export`?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PackageError(f"{path}: corrupt manifest ({exc})") from exc
    if not isinstance(data, dict):
        raise PackageError(f"{path}: corrupt manifest (expected a JSON object)")
    version = data.get("format_version")
    if not isinstance(version, int):
        raise PackageError(f"{path}: no format_version")
    if version > FORMAT_VERSION:
        raise PackageError(
            f"{path}: package format {version} is newer than this kiln understands ({FORMAT_VERSION}); upgrade kiln"
        )
    try:
        manifest = Manifest.from_dict(data)
    except TypeError as exc:
        raise PackageError(f"{path}: corrupt manifest ({exc})") from exc
    if manifest.precision not in PRECISIONS:
        raise PackageError(f"{path}: unknown precision {manifest.precision!r}")
    if manifest.target not in TARGETS:
        raise PackageError(f"{path}: unknown target {manifest.target!r}")
    return manifest


def verify_files(directory: Path, manifest: Manifest, check_hashes: bool = True) -> None:
    """Refuse a package whose files are missing or differ from what export wrote."""
    for name, expected in manifest.files.items():
        path = directory / name
        if not path.is_file():
            raise PackageError(f"{directory}: missing file {name} listed in {MANIFEST_NAME}")
        if check_hashes and sha256_file(path) != expected:
            raise PackageError(f"{path}: corrupt file (sha256 differs from {MANIFEST_NAME})")
