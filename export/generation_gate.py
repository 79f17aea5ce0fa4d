"""The gate for generators: greedy decoding compared token by token with `transformers` `generate`.

On held-out prompts, each alone, the same number of new tokens and the model's own generation
config (eos, penalties, forced tokens) on both sides:
- fp32 must be token-identical on every prompt;
- int8 and fp16 must be identical on a share of prompts (`min_identical`, with its 95% lower bound
  reported), and the report says where outputs part (first divergence), how far the logits moved
  under teacher forcing (the original's own greedy tokens fed to both), and for seq2seq tasks the
  chrF of kiln's text against the original's (100: identical).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
from kiln.export.figures import wilson_lower
from kiln.runtime.generation.package import Generator
from kiln.runtime.pipelines.text_generation import GenerationPipeline

GATE_NEW_TOKENS = 32
GREEDY = {"max_new_tokens": GATE_NEW_TOKENS, "do_sample": False, "num_beams": 1}


@dataclass
class Reference:
    """The original's greedy answers for the validation prompts (their ids and text)."""

    prompts: list[list[int]]
    tokens: list[list[int]]
    texts: list[str]


@dataclass
class GenerationGate:
    passed: bool
    report: dict[str, Any]
    failures: list[str]


def reference(model: Any, generator: Generator, texts: list[str]) -> Reference:
    """transformers `generate`, greedy, one prompt at a time, on the ids kiln's tokenizer gives."""
    import torch

    settings = generator.settings(GREEDY)
    prompts = [generator.tokenize(text, truncate=True)[0] for text in texts]
    tokens = []
    with torch.inference_mode():
        for ids in prompts:
            sequence = generator.sequence(ids, settings, lambda piece: None)  # the same budget of new tokens
            inputs = torch.tensor([ids])
            out = model.generate(
                inputs,
                attention_mask=torch.ones_like(inputs),
                do_sample=False,
                num_beams=1,
                max_new_tokens=max(sequence.allowed, 1),
            )
            start = len(ids) if generator.decoder_only else 1
            tokens.append(out[0, start:].tolist())
    return Reference(prompts, tokens, [generator.detokenizer.decode(t) for t in tokens])


def run_generation_gate(
    pipe: GenerationPipeline, model: Any, ref: Reference, precision: str, min_identical: float
) -> GenerationGate:
    generator = pipe.generator
    ours = _greedy_tokens(generator, ref.prompts)
    identical = [a == b for a, b in zip(ref.tokens, ours, strict=True)]
    share = sum(identical) / len(identical)
    divergence = [_first_difference(a, b) for a, b in zip(ref.tokens, ours, strict=True)]
    parted = [d for d in divergence if d is not None]
    report: dict[str, Any] = {
        "items": len(identical),
        "new_tokens": GATE_NEW_TOKENS,
        "identical": share,
        "identical_lower_95": wilson_lower(sum(identical), len(identical)),
        "first_divergence": {"min": min(parted), "median": float(np.median(parted))} if parted else None,
        "teacher_forced": _teacher_forced(model, generator, ref),
    }
    if not generator.decoder_only:
        texts = [generator.detokenizer.decode(t) for t in ours]
        report["chrf_vs_original"] = float(
            np.mean([chrf(hyp, ref_text) for hyp, ref_text in zip(texts, ref.texts, strict=True)])
        )
    required = 1.0 if precision == "fp32" else min_identical
    report["required_identical"] = required
    failures = []
    if share < required:
        failures.append(
            f"greedy output identical to transformers on {share:.4f} of {len(identical)} held-out prompts "
            f"(required {required}); first divergence at token {report['first_divergence']['min']}"
        )
    return GenerationGate(not failures, report, failures)


def _greedy_tokens(generator: Generator, prompts: list[list[int]]) -> list[list[int]]:
    from kiln.runtime.generation.decoding import Decoding

    settings = generator.settings(GREEDY)
    outputs = []
    for ids in prompts:  # alone, as the reference ran
        sequence = generator.sequence(ids, settings, lambda piece: None)
        decoding = Decoding(generator.decoder, generator.start_id)
        decoding.add([sequence])
        while decoding.active:
            decoding.step()
        outputs.append(sequence.generated)
    return outputs


def _teacher_forced(model: Any, generator: Generator, ref: Reference) -> dict[str, float]:
    """Logit error and top-1 agreement with the original's tokens fed to both sides."""
    import torch

    errors, agree, total = [], 0, 0
    with torch.inference_mode():
        for prompt, target in zip(ref.prompts, ref.tokens, strict=True):
            if not target:
                continue
            ours = generator.decoder.teacher_forced(prompt, target).astype(np.float32)
            if generator.decoder_only:
                theirs = model(torch.tensor([prompt + target[:-1]])).logits[0, len(prompt) - 1 :]
            else:
                start = generator.start_id or 0
                decoder = torch.tensor([[start, *target[:-1]]])
                theirs = model(input_ids=torch.tensor([prompt]), decoder_input_ids=decoder).logits[0]
            theirs = theirs.float().numpy()
            errors.append(float(np.abs(ours - theirs).max()))
            agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
            total += len(target)
    return {"max_logit_error": max(errors, default=0.0), "top1_agreement": agree / max(total, 1)}


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for index, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


def chrf(hypothesis: str, reference_text: str, order: int = 6, beta: float = 2.0) -> float:
    """chrF (Popović 2015), character n-grams up to `order`, spaces removed, as sacrebleu's default."""
    hyp, ref = hypothesis.replace(" ", ""), reference_text.replace(" ", "")
    if hyp == ref:
        return 100.0
    precisions, recalls = [], []
    for n in range(1, order + 1):
        h = Counter(hyp[i : i + n] for i in range(len(hyp) - n + 1))
        r = Counter(ref[i : i + n] for i in range(len(ref) - n + 1))
        if not h or not r:
            continue
        match = sum((h & r).values())
        precisions.append(match / sum(h.values()))
        recalls.append(match / sum(r.values()))
    if not precisions:
        return 0.0
    p, r = float(np.mean(precisions)), float(np.mean(recalls))
    return 0.0 if p + r == 0 else 100 * (1 + beta**2) * p * r / (beta**2 * p + r)
