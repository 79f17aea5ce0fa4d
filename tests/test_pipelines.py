"""Every pipeline option against the `transformers` pipeline on the original PyTorch model.

fp32 packages, so answers must be the same (labels, spans, tokens) and scores within 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest
from kiln.runtime import pipeline

TEXTS = [
    "Alice lives in Seoul and works for Samsung Electronics.",
    "The central bank raised interest rates by a quarter point on Thursday.",
    "한국은행이 기준금리를 0.25%포인트 인상했다.",
    "Great service.",
]


@pytest.fixture(scope="module")
def hf(tiny_model):
    """hf(architecture, task) -> the transformers pipeline on the tiny PyTorch model."""
    from transformers import AutoTokenizer
    from transformers import pipeline as hf_pipeline

    def make(architecture: str, task: str):
        directory = tiny_model(architecture, task)
        return hf_pipeline(task, model=str(directory), tokenizer=AutoTokenizer.from_pretrained(directory), device="cpu")

    return make


def assert_same(theirs, ours, tol=1e-4):
    """Same structure and strings; floats within tol."""
    if isinstance(theirs, dict):
        assert set(theirs) <= set(ours), (theirs, ours)
        for key in theirs:
            assert_same(theirs[key], ours[key], tol)
    elif isinstance(theirs, list | tuple):
        assert len(theirs) == len(ours), (theirs, ours)
        for a, b in zip(theirs, ours, strict=True):
            assert_same(a, b, tol)
    elif isinstance(theirs, float | np.floating):
        assert abs(float(theirs) - float(ours)) <= tol, (theirs, ours)
    else:
        assert theirs == ours, (theirs, ours)


@pytest.mark.parametrize("architecture", ["bert", "roberta"])
@pytest.mark.parametrize(
    "options",
    [{}, {"top_k": None}, {"top_k": 2}, {"function_to_apply": "sigmoid"}, {"function_to_apply": "none", "top_k": 3}],
)
def test_text_classification_options(exported, hf, architecture, options):
    ours = pipeline(exported(architecture, "text-classification"))(TEXTS, **options)
    theirs = [hf(architecture, "text-classification")(t, **options) for t in TEXTS]
    if options.get("top_k", 1) == 1 and "top_k" not in options:
        theirs = [t[0] if isinstance(t, list) else t for t in theirs]
    assert_same(theirs, ours)


def test_text_pairs(exported, hf):
    pairs = ["Is it about money?", "Is it about sports?", "무슨 내용인가요?", "Short."]
    ours = pipeline(exported("bert", "text-classification"))(TEXTS, text_pair=pairs)
    clf = hf("bert", "text-classification")
    theirs = [clf({"text": t, "text_pair": p}) for t, p in zip(TEXTS, pairs, strict=True)]
    assert_same(theirs, ours)


def test_multi_label_uses_sigmoid(exported, tmp_path, tiny_model):
    import json
    import shutil

    from kiln.export.build import ExportOptions, export

    model = tmp_path / "multi"
    shutil.copytree(tiny_model("bert", "text-classification"), model)
    config = json.loads((model / "config.json").read_text())
    config["problem_type"] = "multi_label_classification"
    (model / "config.json").write_text(json.dumps(config))
    export(ExportOptions(model=str(model), output=tmp_path / "pkg"))
    result = pipeline(tmp_path / "pkg")(TEXTS, top_k=None)
    assert all(0 < r["score"] < 1 for row in result for r in row)
    assert any(abs(sum(r["score"] for r in row) - 1) > 1e-3 for row in result)  # not a softmax


@pytest.mark.parametrize("architecture", ["bert", "roberta", "electra"])
@pytest.mark.parametrize("strategy", ["none", "simple", "first", "average", "max"])
def test_token_classification_strategies(exported, hf, architecture, strategy):
    ours = pipeline(exported(architecture, "token-classification"))(TEXTS, aggregation_strategy=strategy)
    theirs = [hf(architecture, "token-classification")(t, aggregation_strategy=strategy) for t in TEXTS]
    assert_same(theirs, ours)


def test_token_classification_keeps_all_labels_on_request(exported, hf):
    ours = pipeline(exported("bert", "token-classification"))(TEXTS[:1], ignore_labels=[])
    theirs = hf("bert", "token-classification")(TEXTS[0], ignore_labels=[])
    assert_same(theirs, ours[0])
    package = pipeline(exported("bert", "token-classification"))
    tokens = package.encoder.tokenize(TEXTS[:1])[0]
    assert len(ours[0]) == sum(1 for special in tokens.special_tokens_mask if not special)  # "O" included


@pytest.mark.parametrize("architecture", ["bert", "distilbert"])
@pytest.mark.parametrize(
    "options",
    [{}, {"top_k": 3}, {"max_answer_len": 3}, {"handle_impossible_answer": True}, {"top_k": 2, "max_answer_len": 30}],
)
def test_question_answering_options(exported, hf, architecture, options):
    questions = ["Where does Alice live?", "What happened?", "무엇이 올랐나?"]
    contexts = TEXTS[:3]
    ours = pipeline(exported(architecture, "question-answering"))(questions, contexts, **options)
    qa = hf(architecture, "question-answering")
    theirs = [qa(question=q, context=c, **options) for q, c in zip(questions, contexts, strict=True)]
    assert_same(theirs, ours)


def test_question_answering_long_context_with_stride(exported, hf):
    context = " ".join(TEXTS * 12)  # several windows of 128 tokens
    options = {"max_seq_len": 64, "doc_stride": 16, "top_k": 3}
    ours = pipeline(exported("bert", "question-answering"))(["Where does Alice live?"], [context], **options)
    theirs = hf("bert", "question-answering")(question="Where does Alice live?", context=context, **options)
    assert_same(theirs, ours[0])


@pytest.mark.parametrize("options", [{}, {"top_k": 2}, {"targets": ["bank", "rates", "seoul"]}])
def test_fill_mask_options(exported, hf, options):
    texts = ["The central [MASK] raised interest rates.", "Alice lives in [MASK]."]
    ours = pipeline(exported("bert", "fill-mask"))(texts, **options)
    theirs = [hf("bert", "fill-mask")(t, **options) for t in texts]
    for a, b in zip(theirs, ours, strict=True):
        assert [x["token"] for x in a] == [x["token"] for x in b]
        assert_same([x["score"] for x in a], [x["score"] for x in b])


def test_fill_mask_needs_a_mask(exported):
    from kiln.runtime.errors import InvalidInput

    with pytest.raises(InvalidInput, match=r"has no \[MASK\] token"):
        pipeline(exported("bert", "fill-mask"))(["no mask here"])


@pytest.mark.parametrize("pooling", ["mean", "cls", "max"])
def test_feature_extraction_pooling(exported, tiny_model, pooling):
    import torch
    from transformers import AutoModel, AutoTokenizer

    directory = tiny_model("bert", "feature-extraction")
    model, tokenizer = AutoModel.from_pretrained(directory).eval(), AutoTokenizer.from_pretrained(directory)
    ours = pipeline(exported("bert", "feature-extraction"))(TEXTS, pooling=pooling, normalize_embeddings=True)
    for text, vector in zip(TEXTS, ours, strict=True):
        with torch.no_grad():
            tokens = model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0].numpy()
        expected = {"mean": tokens.mean(0), "cls": tokens[0], "max": tokens.max(0)}[pooling]
        expected /= np.linalg.norm(expected)
        assert np.abs(vector - expected).max() < 1e-4


@pytest.mark.parametrize(
    "options",
    [
        {"candidate_labels": ["politics", "economy", "sports"]},
        {"candidate_labels": "politics, economy", "multi_label": True},
        {"candidate_labels": ["weather"]},
        {"candidate_labels": ["politics", "sports"], "hypothesis_template": "이 글은 {}에 관한 것이다."},
    ],
)
def test_zero_shot_options(exported, hf, options):
    ours = pipeline(exported("bert", "zero-shot-classification"))(TEXTS, **options)
    theirs = [hf("bert", "zero-shot-classification")(t, **options) for t in TEXTS]
    assert_same(theirs, ours)


def test_zero_shot_needs_an_nli_model(tiny_model, tmp_path):
    from kiln.export.build import ExportOptions, export
    from kiln.runtime.errors import UnsupportedModel

    with pytest.raises(UnsupportedModel, match="needs an NLI sequence classifier"):
        export(
            ExportOptions(
                model=str(tiny_model("bert", "text-classification")),
                output=tmp_path / "o",
                task="zero-shot-classification",
            )
        )
