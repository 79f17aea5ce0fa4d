"""Tiny Hugging Face models built locally: random weights, locally trained tokenizers.

No test reaches a hub. Each builder writes a directory with save_pretrained, exactly what a user's
fine-tuned model directory looks like, and kiln exports from there.
"""

from __future__ import annotations

import os
from pathlib import Path

from kiln.export.tasks import torch_class
from kiln.export.texts import builtin_texts

EXTRA_TEXT = [
    "Alice lives in Seoul and works for Samsung.",
    "Bob visited Paris with Carol last summer.",
    "The quick brown fox jumps over the lazy dog.",
]
LABELS = {
    "text-classification": ["politics", "economy", "sports", "science"],
    "token-classification": ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"],
    "zero-shot-classification": ["contradiction", "neutral", "entailment"],
}
SIZE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}


def _corpus() -> list[str]:
    return builtin_texts() + EXTRA_TEXT


def _wordpiece_vocab(tok, specials: list[str], words: int = 400) -> dict[str, int]:
    """A WordPiece vocabulary built in plain Python, so it is the same on every run (the Rust
    trainers break frequency ties in hash order, which changes ids, models and gate results)."""
    from collections import Counter

    counts: Counter = Counter()
    for text in _corpus():
        normalized = tok.normalizer.normalize_str(text)
        counts.update(piece for piece, _ in tok.pre_tokenizer.pre_tokenize_str(normalized))
    chars = sorted({c for word in counts for c in word})
    frequent = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if len(w) > 1][:words]
    tokens = [*specials, *chars, *(f"##{c}" for c in chars), *frequent]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}


def wordpiece_tokenizer(directory: Path, architecture: str = "bert"):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast, DistilBertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    probe = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    probe.normalizer = normalizers.BertNormalizer(lowercase=True)
    probe.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok = Tokenizer(models.WordPiece(_wordpiece_vocab(probe, specials), unk_token="[UNK]"))
    tok.normalizer = probe.normalizer
    tok.pre_tokenizer = probe.pre_tokenizer
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tok.decoder = decoders.WordPiece()
    cls = DistilBertTokenizerFast if architecture == "distilbert" else BertTokenizerFast
    fast = cls(tokenizer_object=tok, model_max_length=128)
    fast.save_pretrained(directory)
    return fast


def bytelevel_tokenizer(directory: Path):
    """Byte-level BPE with the 256 byte symbols and no merges: a valid RoBERTa tokenizer whose
    vocabulary does not depend on training order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import RobertaTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([*specials, *alphabet])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens(specials)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True)
    tok.decoder = decoders.ByteLevel()
    fast = RobertaTokenizerFast(tokenizer_object=tok, model_max_length=128)
    fast.save_pretrained(directory)
    return fast


def build(directory: Path, architecture: str, task: str, seed: int = 0) -> Path:
    """Write a tiny model of `architecture` ('bert', 'roberta', 'distilbert', 'electra') with a
    head for `task` to directory, and return it."""
    import torch

    # one thread for tokenizer training and model fitting: the same bits on every run and machine,
    # so a gate result seen here is the result CI sees
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build(directory, architecture, task, seed)
    finally:
        torch.set_num_threads(threads)


def _build(directory: Path, architecture: str, task: str, seed: int) -> Path:
    import torch
    import transformers

    torch.manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = (
        bytelevel_tokenizer(directory) if architecture == "roberta" else wordpiece_tokenizer(directory, architecture)
    )
    labels = LABELS.get(task, [])
    common = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "id2label": dict(enumerate(labels)) if labels else None,
        "label2id": {label: i for i, label in enumerate(labels)} if labels else None,
        "initializer_range": 0.02,
    }
    if architecture == "distilbert":
        config = transformers.DistilBertConfig(
            dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=130, **common
        )
    elif architecture == "roberta":
        config = transformers.RobertaConfig(
            **SIZE, max_position_embeddings=130, type_vocab_size=1, bos_token_id=0, eos_token_id=2, **common
        )
    elif architecture == "electra":
        config = transformers.ElectraConfig(**SIZE, embedding_size=32, max_position_embeddings=128, **common)
    else:
        config = transformers.BertConfig(**SIZE, max_position_embeddings=128, **common)
    if not labels:
        config.id2label = {0: "LABEL_0", 1: "LABEL_1"}
        config.label2id = {"LABEL_0": 0, "LABEL_1": 1}
    model = torch_class(task).from_config(config)
    if task != "feature-extraction":
        _fit(model, tokenizer, task)
    model.eval().save_pretrained(directory)
    return directory


def _fit(model, tokenizer, task: str, steps: int = 60, max_steps: int = 400) -> None:
    """A few steps of training on synthetic labels, so the head is confident as a fine-tuned
    model's is. A random head scores every label almost alike, and any rounding flips its top-1."""
    import torch
    from kiln.export.task_exports import GATE_LABELS as ZERO_SHOT_LABELS
    from kiln.export.task_exports import QUESTIONS

    texts = _corpus()
    # pair tasks train on pairs, as the parity gate will ask them
    if task == "question-answering":
        seconds = [QUESTIONS[i % len(QUESTIONS)] for i in range(len(texts))]
        batch = tokenizer(seconds, texts, padding=True, truncation="only_second", max_length=64, return_tensors="pt")
    elif task == "zero-shot-classification":  # every text with every hypothesis the gate will pair it with
        pairs = [(t, f"This example is {label}.") for t in texts for label in ZERO_SHOT_LABELS]
        texts = [f"{t} {h}" for t, h in pairs]  # only used for the labels below
        batch = tokenizer(
            [t for t, _ in pairs],
            [h for _, h in pairs],
            padding=True,
            truncation="only_first",
            max_length=64,
            return_tensors="pt",
        )
    else:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    generator = torch.Generator().manual_seed(0)
    if task in ("text-classification", "zero-shot-classification"):
        labels = {"labels": torch.tensor([len(t) % model.config.num_labels for t in texts])}
    elif task == "token-classification":
        labels = {"labels": torch.where(mask.bool(), ids % model.config.num_labels, -100)}
    elif task == "question-answering":  # the answer: the context's second and third tokens
        starts = [batch.sequence_ids(i).index(1) + 1 for i in range(len(texts))]
        ends = [min(start + 2, int(mask[i].sum()) - 2) for i, start in enumerate(starts)]
        labels = {"start_positions": torch.tensor(starts), "end_positions": torch.tensor(ends)}
    else:  # fill-mask: restore masked tokens, masks drawn afresh each step, so any word the gate masks is learnt
        labels = {}
    inputs = {k: v for k, v in batch.items() if k in tokenizer.model_input_names}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    # until the (memorisable) synthetic labels are learnt: the gate checks these same texts, and a
    # confident head keeps its top-1 under int8 rounding whatever thread timing did to the weights
    for step in range(max_steps):
        if task == "fill-mask":
            masked = (torch.rand(ids.shape, generator=generator) < 0.15) & mask.bool()
            # every position learns its token (the gate's raw figures compare the top-1 at every position)
            labels = {"labels": torch.where(mask.bool(), ids, -100)}
            inputs["input_ids"] = torch.where(masked, tokenizer.mask_token_id, ids)
        optimizer.zero_grad()
        loss = model(**inputs, **labels).loss
        loss.backward()
        optimizer.step()
        if step >= steps and loss.item() < 0.05:
            break
