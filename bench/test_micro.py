"""Microbenchmarks (pytest-benchmark), outside the test run: `pytest bench/test_micro.py`.

Tokenization, post-processing and the batcher's own overhead, on a tiny local model, so a change
that slows a hot path shows up without a full bench run.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

TEXTS = ["The central bank raised interest rates by a quarter point on Thursday."] * 16


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    import tiny_models
    from kiln.export.build import ExportOptions, export
    from kiln.runtime import pipeline

    model = tiny_models.build(tmp_path_factory.mktemp("model"), "bert", "token-classification")
    out = tmp_path_factory.mktemp("pkg") / "pkg"
    export(ExportOptions(model=str(model), output=out))
    return pipeline(out)


def test_tokenize_16(benchmark, classifier):
    benchmark(classifier.encoder.encode, TEXTS)


def test_pad_16(benchmark, classifier):
    encodings = classifier.encoder.tokenize(TEXTS)
    benchmark(classifier.encoder.pad, encodings)


def test_token_postprocess_first(benchmark, classifier):
    encodings = classifier.encoder.tokenize(TEXTS[:1])
    logits = classifier.forward(encodings)[0]["logits"]
    from kiln.runtime.pipelines.base import softmax

    scores = softmax(logits)
    benchmark(lambda: classifier._aggregate(classifier._tokens(TEXTS[0], encodings[0], scores), "first"))


def test_batcher_round_trip(benchmark, classifier):
    """The batcher's overhead on a trivial 'session': queueing, grouping, splitting, futures."""
    from kiln.runtime.serve.batcher import Batcher, BatchOptions, RequestState

    batcher = Batcher(
        "micro",
        lambda seqs, alone: {"x": np.zeros((len(seqs), 1))},
        lambda out, row, n: {"x": out["x"][row]},
        BatchOptions(max_delay=0.0),
    )
    batcher.start()
    encodings = classifier.encoder.tokenize(TEXTS)
    with ThreadPoolExecutor(4) as pool:
        benchmark(lambda: list(pool.map(lambda e: batcher.run([e], RequestState()), encodings)))
    batcher.stop()
