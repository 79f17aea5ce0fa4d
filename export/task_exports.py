"""What the export knows of each task, registered per task as optimum registers an OnnxConfig per
architecture: the transformers head it exports, what it reads of the model (pooling), and
how the gate compares kiln's answers with the original's. Task specs (kiln.runtime.tasks) keep what a
task is at run time; every task has an entry here (checked at import, and by tests/test_tasks.py)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from kiln.runtime.errors import InvalidInput, UnsupportedModel
from kiln.runtime.pipelines.feature_extraction import normalize, pool
from kiln.runtime.tasks import SPECS
from kiln.runtime.tasks.spec import Params, Texts

# the gate's inputs made from plain sentences: a question for each context, labels for zero-shot
QUESTIONS = ("What happened?", "Who is it about?", "무엇에 관한 내용인가요?", "Where?")
GATE_LABELS = ("politics", "economy", "sports", "technology")


@dataclass(frozen=True)
class Gate:
    """How the export gate compares the task with the original model.

    items: the validation inputs made from plain sentences (the mask token for fill-mask);
    params: the parameters both sides are called with; theirs: the original's answers (the
    `transformers` pipeline, or for embeddings the PyTorch outputs pooled); ours: the per-item
    answers out of the task's answers; agreement: how often the two agree.
    """

    hf_task: str | None
    items: Callable[[list[str], str | None], Texts]
    theirs: Callable[[Any, Texts, list[dict[str, np.ndarray]], Any], list[Any]]
    agreement: Callable[[list[Any], list[Any]], dict[str, Any]]
    params: Params = field(default_factory=dict)
    ours: Callable[[Any], list[Any]] = list


@dataclass(frozen=True)
class TaskExport:
    head: str  # the transformers class-name suffix of this task's head
    auto_class: str  # the transformers Auto class that loads that head
    gate: Gate
    pooling: bool = False  # pooling and normalisation come from a sentence-transformers layout
    from_head: bool = True  # chosen automatically when the model's head is `head` (else only by --task)
    optimum_task: str | None = None  # optimum's name for the graph, where it differs
    check_config: Callable[[dict[str, Any]], None] | None = None  # refuses a model this task cannot use


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


# ---- text-classification -------------------------------------------------------------------------


def _label_agreement(theirs: list[Any], ours: list[Any]) -> dict[str, Any]:
    pairs = list(zip(theirs, ours, strict=True))
    return {
        "items": len(pairs),
        "agreement": float(np.mean([a["label"] == b["label"] for a, b in pairs])),
        "max_score_diff": float(max(abs(a["score"] - b["score"]) for a, b in pairs)),
    }


TEXT_CLASSIFICATION = TaskExport(
    "ForSequenceClassification",
    "AutoModelForSequenceClassification",
    Gate(
        hf_task="text-classification",
        items=lambda texts, mask: {"text": texts},
        # truncated like kiln's default (transformers' default is not to truncate)
        theirs=lambda hf, items, reference, pooling: [hf(t, truncation=True)[0] for t in items["text"]],
        ours=lambda answers: [ranked[0] for ranked in answers.ranked],
        agreement=_label_agreement,
    ),
)

# ---- token-classification ------------------------------------------------------------------------


def _entity_f1(theirs: list[list[dict]], ours: list[list[dict]]) -> dict[str, Any]:
    """Entity spans as micro F1: (group, start, end) triples found by both sides."""
    matched = total = 0
    for a, b in zip(theirs, ours, strict=True):
        spans_a, spans_b = Counter(_spans(a)), Counter(_spans(b))
        matched += sum((spans_a & spans_b).values())
        total += sum(spans_a.values()) + sum(spans_b.values())
    return {"items": len(theirs), "agreement": 1.0 if total == 0 else 2 * matched / total, "aggregation": "simple"}


def _spans(entities: list[dict]) -> list[tuple[str, int, int]]:
    return [(e["entity_group"], int(e["start"]), int(e["end"])) for e in entities]


TOKEN_CLASSIFICATION = TaskExport(
    "ForTokenClassification",
    "AutoModelForTokenClassification",
    Gate(
        hf_task="token-classification",
        items=lambda texts, mask: {"text": texts},
        theirs=lambda hf, items, reference, pooling: [hf(t, aggregation_strategy="simple") for t in items["text"]],
        agreement=_entity_f1,
        params={"aggregation_strategy": "simple"},
    ),
)

# ---- question-answering --------------------------------------------------------------------------


def _with_questions(texts: list[str], mask: str | None) -> Texts:
    return {"question": [QUESTIONS[i % len(QUESTIONS)] for i in range(len(texts))], "context": texts}


def _span_agreement(theirs: list[Any], ours: list[Any]) -> dict[str, Any]:
    same = [(a["start"], a["end"]) == (b["start"], b["end"]) for a, b in zip(theirs, ours, strict=True)]
    return {"items": len(same), "agreement": float(np.mean(same))}


QUESTION_ANSWERING = TaskExport(
    "ForQuestionAnswering",
    "AutoModelForQuestionAnswering",
    Gate(
        hf_task="question-answering",
        items=_with_questions,
        theirs=lambda hf, items, reference, pooling: [
            hf(question=q, context=c) for q, c in zip(items["question"], items["context"], strict=True)
        ],
        ours=lambda answers: [a[0] for a in answers],
        agreement=_span_agreement,
    ),
)

# ---- feature-extraction --------------------------------------------------------------------------


def _pooled(hf: Any, items: Texts, reference: list[dict[str, np.ndarray]], pooling: Any) -> list[Any]:
    """No transformers pipeline pools like sentence-transformers: the PyTorch outputs, pooled."""
    vectors = np.stack([pool(item["last_hidden_state"], pooling.mode) for item in reference])
    return list(normalize(vectors) if pooling.normalize else vectors)


def _cosines(theirs: list[Any], ours: list[Any]) -> dict[str, Any]:
    cosines = [cosine(a, b) for a, b in zip(theirs, ours, strict=True)]
    return {"items": len(cosines), "min_cosine": float(min(cosines)), "mean_cosine": float(np.mean(cosines))}


FEATURE_EXTRACTION = TaskExport(
    "Model",
    "AutoModel",
    Gate(hf_task=None, items=lambda texts, mask: {"text": texts}, theirs=_pooled, agreement=_cosines),
    pooling=True,
)

# ---- fill-mask -----------------------------------------------------------------------------------


def _masked(texts: list[str], mask: str | None) -> Texts:
    """Each sentence with one word masked (a different position from sentence to sentence)."""
    masked = []
    for index, text in enumerate(texts):
        words = text.split(" ")
        words[index % len(words)] = mask or "[MASK]"
        masked.append(" ".join(words))
    return {"text": masked}


def _token_agreement(theirs: list[Any], ours: list[Any]) -> dict[str, Any]:
    same = [a["token"] == b["token"] for a, b in zip(theirs, ours, strict=True)]
    return {"items": len(same), "agreement": float(np.mean(same))}


FILL_MASK = TaskExport(
    "ForMaskedLM",
    "AutoModelForMaskedLM",
    Gate(
        hf_task="fill-mask",
        items=_masked,
        theirs=lambda hf, items, reference, pooling: [
            hf(t, top_k=1, tokenizer_kwargs={"truncation": True})[0] for t in items["text"]
        ],
        ours=lambda answers: [fills[0] for fills in answers],
        agreement=_token_agreement,
        params={"top_k": 1},
    ),
)

# ---- zero-shot-classification --------------------------------------------------------------------


def _nli_classifier(config: dict[str, Any]) -> None:
    """Zero-shot needs an NLI sequence classifier: one of its labels is entailment."""
    architectures = config.get("architectures") or ["a base model"]
    labels = [str(label).lower() for label in (config.get("id2label") or {}).values()]
    if not architectures[0].endswith("ForSequenceClassification") or not any(x.startswith("entail") for x in labels):
        raise UnsupportedModel(
            "zero-shot-classification needs an NLI sequence classifier with an 'entailment' label; "
            f"this model is {architectures[0]} with labels {labels}"
        )


def _best_label_agreement(theirs: list[Any], ours: list[Any]) -> dict[str, Any]:
    pairs = list(zip(theirs, ours, strict=True))
    return {
        "items": len(pairs),
        "agreement": float(np.mean([a["labels"][0] == b["labels"][0] for a, b in pairs])),
        "max_score_diff": float(max(abs(a["scores"][0] - b["scores"][0]) for a, b in pairs)),
    }


ZERO_SHOT = TaskExport(
    "ForSequenceClassification",  # an NLI classifier
    "AutoModelForSequenceClassification",
    Gate(
        hf_task="zero-shot-classification",
        items=lambda texts, mask: {"text": texts, "candidate_labels": list(GATE_LABELS)},
        theirs=lambda hf, items, reference, pooling: [
            hf(t, candidate_labels=list(items["candidate_labels"])) for t in items["text"]
        ],
        agreement=_best_label_agreement,
    ),
    from_head=False,  # an NLI model's head is a sequence classifier's: zero-shot is asked for with --task
    optimum_task="text-classification",
    check_config=_nli_classifier,
)

# ---- generators ----------------------------------------------------------------------------------


def _greedy_agreement(theirs: list[Any], ours: list[Any]) -> dict[str, Any]:
    same = [a == b for a, b in zip(theirs, ours, strict=True)]
    return {"items": len(same), "identical": float(sum(same) / max(len(same), 1))}


def _not_through_a_pipeline(*args: Any) -> Any:
    raise InvalidInput("generation runs through the decoding loop, not the encoder batcher")


def _generator(task: str, head: str, auto_class: str, optimum_task: str, from_head: bool) -> TaskExport:
    gate = Gate(hf_task=task, items=lambda texts, mask: {"text_input": texts}, theirs=_not_through_a_pipeline,
                agreement=_greedy_agreement)  # fmt: skip
    return TaskExport(head, auto_class, gate, from_head=from_head, optimum_task=optimum_task)


_SEQ2SEQ = ("ForConditionalGeneration", "AutoModelForSeq2SeqLM", "text2text-generation-with-past")
EXPORTS: dict[str, TaskExport] = {
    "text-classification": TEXT_CLASSIFICATION,
    "token-classification": TOKEN_CLASSIFICATION,
    "question-answering": QUESTION_ANSWERING,
    "feature-extraction": FEATURE_EXTRACTION,
    "fill-mask": FILL_MASK,
    "zero-shot-classification": ZERO_SHOT,
    "text-generation": _generator(
        "text-generation", "ForCausalLM", "AutoModelForCausalLM", "text-generation-with-past", True
    ),
    "text2text-generation": _generator("text2text-generation", *_SEQ2SEQ, True),
    "summarization": _generator("summarization", *_SEQ2SEQ, False),
    "translation": _generator("translation", *_SEQ2SEQ, False),
}
_missing = sorted(set(SPECS) - set(EXPORTS))
if _missing:  # a task added without its export entry fails at import
    raise ImportError(f"tasks without an export entry (kiln.export.task_exports): {', '.join(_missing)}")
