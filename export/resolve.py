"""Finding the model: a local directory, or a Hub id through huggingface_hub and its cache.

huggingface_hub reads HF_HUB_OFFLINE, HF_TOKEN and HF_HOME itself; kiln adds only readable errors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.runtime.errors import ModelNotFound, NotAModel

WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
_SKIP = [
    "*.onnx",
    "*.onnx_data",
    "*.h5",
    "*.msgpack",
    "*.ot",
    "*.tflite",
    "onnx/*",
    "openvino/*",
    "coreml/*",
    "*.mlmodel",
]


@dataclass
class ResolvedModel:
    """Where the model's files are on disk, and where they came from."""

    path: Path
    model_id: str
    revision: str | None = None
    commit: str | None = None

    def config(self) -> dict[str, Any]:
        return json.loads((self.path / "config.json").read_text(encoding="utf-8"))


def resolve_model(model: str, revision: str | None = None) -> ResolvedModel:
    local = Path(model).expanduser()
    if local.exists() or model.startswith((".", "/", "~")):
        return _local(local)
    return _hub(model, revision)


def _local(path: Path) -> ResolvedModel:
    if not path.exists():
        raise ModelNotFound(f"{path}: no such directory")
    if not path.is_dir():
        raise NotAModel(f"{path}: not a directory; pass a model directory or a Hub id")
    _check_model_dir(path)
    return ResolvedModel(path=path.resolve(), model_id=str(path.resolve()))


def _check_model_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise NotAModel(f"{path}: not a Hugging Face model directory (no config.json)")
    try:
        json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NotAModel(f"{path}/config.json is not valid JSON: {exc}") from exc
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise NotAModel(f"{path}: no model weights (expected one of {', '.join(WEIGHT_FILES)})")


def _hub(model_id: str, revision: str | None) -> ResolvedModel:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        path = Path(snapshot_download(model_id, revision=revision, ignore_patterns=_SKIP))
    except HFValidationError as exc:
        raise ModelNotFound(f"{model_id!r} is neither a local directory nor a valid Hub id") from exc
    except GatedRepoError as exc:
        raise ModelNotFound(f"{model_id}: gated on the Hub; set HF_TOKEN to a token with access") from exc
    except RepositoryNotFoundError as exc:
        raise ModelNotFound(f"{model_id}: no such model on the Hub (or it is private: set HF_TOKEN)") from exc
    except RevisionNotFoundError as exc:
        raise ModelNotFound(f"{model_id}: no revision {revision!r}") from exc
    except LocalEntryNotFoundError as exc:
        raise ModelNotFound(
            f"{model_id}: not in the Hugging Face cache and the Hub cannot be reached "
            "(offline or HF_HUB_OFFLINE=1); download it once while online, or pass a local directory"
        ) from exc
    except OSError as exc:  # network failures surface as OSError subclasses
        raise ModelNotFound(f"{model_id}: could not be fetched from the Hub: {exc}") from exc
    _check_model_dir(path)
    return ResolvedModel(path=path, model_id=model_id, revision=revision, commit=path.name)
