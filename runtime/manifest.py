"""kiln.json: the manifest that describes a package, shared by the writer (export) and the loader.

A package may come from anywhere, so the manifest is checked against a strict schema before use
(`ManifestSchema`, pydantic; its JSON Schema is published as `kiln.schema.json` beside this file):
types are not coerced ("256x" is not a length, "1" is not a batch size), unknown fields are
refused, and every file the manifest names must be a plain name inside the package.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kiln.runtime.errors import PackageError
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, field_validator

FORMAT_VERSION = 1
MANIFEST_NAME = "kiln.json"
MODEL_NAME = "model.onnx"

PRECISIONS = ("fp32", "fp16", "int8-dynamic", "int8-static")
TARGETS = ("cpu", "cuda", "tensorrt")  # the execution provider a package's graph is shaped for
GRAPH_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")  # no separators, no "..", not hidden


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class PoolingSchema(_Strict):
    mode: Literal["mean", "cls", "max"] = "mean"
    normalize: StrictBool = False


class GenerationSchema(_Strict):
    """How a generator's sessions fit together (kiln.runtime.generation.sessions)."""

    layout: Literal["decoder-only", "encoder-decoder"]
    sessions: dict[Literal["decoder", "encoder", "decoder_with_past"], StrictStr]
    max_positions: StrictInt = Field(gt=0, le=1_000_000)
    max_source: StrictInt | None = Field(default=None, gt=0, le=1_000_000)
    decoder_start_token_id: StrictInt | None = None

    @field_validator("sessions")
    @classmethod
    def _session_files(cls, sessions: dict[str, str]) -> dict[str, str]:
        needed = {"decoder"} if "encoder" not in sessions else {"encoder", "decoder", "decoder_with_past"}
        if set(sessions) != needed:
            raise ValueError(f"sessions must be {sorted(needed)}, got {sorted(sessions)}")
        for name in sessions.values():
            if not _PLAIN_NAME.match(name):
                raise ValueError(f"session file {name!r} is not a plain name inside the package")
        return sessions


class ManifestSchema(_Strict):
    """kiln.json, format 1."""

    format_version: Literal[1]
    task: StrictStr
    precision: Literal["fp32", "fp16", "int8-dynamic", "int8-static"]
    target: Literal["cpu", "cuda", "tensorrt"] = "cpu"
    inputs: list[Literal["input_ids", "attention_mask", "token_type_ids"]] = Field(min_length=1)
    outputs: list[StrictStr] = Field(min_length=1)
    max_sequence_length: StrictInt = Field(gt=0, le=1_000_000)
    labels: list[StrictStr] = []
    problem_type: StrictStr | None = None
    model_type: StrictStr = ""
    opset: StrictInt = Field(default=17, gt=0)
    pooling: PoolingSchema | None = None
    mask_token: StrictStr | None = None
    max_batch_size: StrictInt = Field(default=0, ge=0)
    quantization: dict[str, Any] = {}
    source: dict[str, Any] = {}
    files: dict[str, StrictStr] = {}
    tools: dict[str, StrictStr] = {}
    parity: dict[str, Any] = {}
    generation: GenerationSchema | None = None

    @field_validator("files")
    @classmethod
    def _plain_names(cls, files: dict[str, str]) -> dict[str, str]:
        for name, digest in files.items():
            if not _PLAIN_NAME.match(name):
                raise ValueError(f"file name {name!r} is not a plain name inside the package")
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(f"file {name!r} has no sha256 (got {digest!r})")
        return files


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
    # 1: run one text per session call, for a graph whose rows round differently with the rows
    # beside them (the export found its outputs not bit-identical alone and batched). 0: any size.
    max_batch_size: int = 0
    quantization: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    tools: dict[str, str] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    # generators only: the layout of their sessions (kiln.runtime.generation); None for encoders
    generation: dict[str, Any] | None = None
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
        checked = ManifestSchema.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top level)"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise PackageError(f"{path}: field {where}: {first['msg']}{more}") from exc
    return Manifest.from_dict(checked.model_dump())


def inside(directory: Path, name: str) -> Path:
    """A package file, refused if it (or a link on its way) leads outside the package."""
    path = directory / name
    if not path.resolve().is_relative_to(directory.resolve()):
        raise PackageError(f"{directory}: {name} leads outside the package (to {path.resolve()}); refused")
    return path


def verify_files(directory: Path, manifest: Manifest, check_hashes: bool = True) -> None:
    """Refuse a package whose files are missing, lead outside it, or differ from what export wrote."""
    for name, expected in manifest.files.items():
        path = inside(directory, name)
        if not path.is_file():
            raise PackageError(f"{directory}: missing file {name} listed in {MANIFEST_NAME}")
        if check_hashes and sha256_file(path) != expected:
            raise PackageError(f"{path}: corrupt file (sha256 differs from {MANIFEST_NAME})")


def json_schema() -> str:
    """The JSON Schema of kiln.json, as published in kiln.schema.json."""
    schema = ManifestSchema.model_json_schema()
    schema["$id"] = "https://kiln.dev/schemas/kiln.json/1"
    schema["title"] = "kiln package manifest (kiln.json), format 1"
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"
