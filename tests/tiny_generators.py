"""Tiny generator models built and trained locally: GPT-2, BART and T5 that greedy-decode real text.

A generator with random weights greedy-decodes noise, and noise hides bugs: a runtime that drops
the past key values, mis-orders a cache or forgets the decoder start token still "produces tokens".
These models have learnt something checkable in a few seconds of CPU training:

* GPT-2 continues the sentences of NEWS (English and Korean news titles) and stops at its eos;
* BART "summarises" a story of two NEWS sentences as the first words of its lead sentence;
* T5 translates [adjective] noun [verb] sentences of DICTIONARY words into Korean, word by word.

No test reaches a hub. Each builder writes a directory with save_pretrained, exactly what a user's
fine-tuned model directory looks like. Tokenizers are fast tokenizers (tokenizer.json, which is all
the runtime reads), their vocabularies built in plain Python: the Rust trainers may break frequency
ties in hash order, and then ids, weights and every expected output change from run to run. Model
training runs on one thread with fixed seeds and deterministic algorithms, so a build is
byte-for-byte the same on every run on one machine.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path

# English and Korean news titles: what GPT-2 learns to continue and BART to summarise. Every one
# starts differently, so a prompt of its first words has one right continuation.
NEWS = [
    "Stocks rally as the central bank holds interest rates steady.",
    "Heavy rain floods roads across the southern coast overnight.",
    "Scientists discover a new species of frog in the rainforest.",
    "City council approves a plan to build more bike lanes.",
    "Local team wins the championship after a dramatic final.",
    "Oil prices fall for the third week in a row.",
    "A new museum of modern art opens downtown this weekend.",
    "Researchers report progress on a vaccine for malaria.",
    "The airport expects record crowds during the holiday season.",
    "Farmers worry about a long dry summer and poor harvests.",
    "Engineers test a driverless bus on quiet city streets.",
    "The government announces new rules for online privacy.",
    "Tech company unveils a faster and cheaper smartphone.",
    "Students return to school as the new term begins.",
    "Wildfire forces thousands to leave their homes in the hills.",
    "Astronomers spot a comet that will be visible next month.",
    "Train workers plan a strike over pay and working hours.",
    "Housing prices rise again in the capital this spring.",
    "Doctors warn of a busy flu season this winter.",
    "Electric car sales double compared with last year.",
    "Volunteers clean up plastic waste from the river banks.",
    "Famous singer announces a world tour for next year.",
    "Unemployment drops to its lowest level in a decade.",
    "Police arrest two men after a bank robbery in the harbor.",
    "Ministers meet to discuss climate targets and energy.",
    "Bakery chain opens its hundredth store in the country.",
    "Marathon runners brave the cold on a windy morning.",
    "Library extends opening hours for exam season.",
    "Zoo welcomes the birth of a baby panda.",
    "Festival of lights draws large crowds to the old town.",
    "Hospital opens a new wing for children with cancer.",
    "Ferry services resume after the storm passes.",
    "서울 지하철 요금이 다음 달부터 오른다.",
    "부산에서 국제 영화제가 화려하게 개막했다.",
    "올여름 폭염으로 전력 수요가 크게 늘었다.",
    "정부는 청년 일자리 대책을 새로 발표했다.",
    "한국 축구 대표팀이 월드컵 본선에 진출했다.",
    "제주도에 관광객이 몰리면서 항공권이 매진됐다.",
    "반도체 수출이 석 달 연속 증가했다.",
    "태풍이 남해안을 지나 동해로 빠져나갔다.",
    "새 학기를 맞아 학생들이 학교로 돌아왔다.",
    "국내 연구진이 새로운 배터리 기술을 개발했다.",
    "주말 고속도로는 귀성 차량으로 붐볐다.",
    "물가 상승으로 외식비 부담이 커지고 있다.",
    "인공지능 번역기가 빠르게 발전하고 있다.",
    "겨울 첫눈이 강원도 산간에 내렸다.",
    "전통 시장에 손님들이 다시 찾아오고 있다.",
    "우주 발사체가 궤도 진입에 성공했다.",
]

# English -> Korean, what T5 learns to translate word by word. Its sentences are [adjective] noun
# [verb]: each word's class fixes its place, so a two-layer T5 (whose cross-attention has no
# positions) learns the order in seconds, and any of the 8 * 18 * 8 combinations comes out right.
ADJECTIVES = {
    "red": "빨간",
    "blue": "파란",
    "big": "큰",
    "small": "작은",
    "old": "오래된",
    "new": "새로운",
    "happy": "행복한",
}
NOUNS = {
    "apple": "사과", "cat": "고양이", "dog": "개", "water": "물", "book": "책", "school": "학교",
    "house": "집", "tree": "나무", "friend": "친구", "mother": "어머니", "city": "도시", "river": "강",
    "mountain": "산", "car": "자동차", "flower": "꽃", "bread": "빵", "sea": "바다", "bird": "새",
}  # fmt: skip
VERBS = {
    "runs": "달린다",
    "sleeps": "잔다",
    "sings": "노래한다",
    "eats": "먹는다",
    "grows": "자란다",
    "falls": "떨어진다",
    "shines": "빛난다",
}
DICTIONARY = {**ADJECTIVES, **NOUNS, **VERBS}
T5_PREFIX = "translate English to Korean: "

GPT2_SIZE = {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128}
SUMMARY_WORDS = 3  # BART's "summary": the lead sentence's first words
GPT2_EOS = "<|endoftext|>"
BART_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3 as in facebook/bart-*; <mask> goes last
T5_SPECIALS = ["<pad>", "</s>", "<unk>"]  # ids 0..2 as in t5-small


@contextmanager
def _deterministic(seed: int = 0) -> Iterator[None]:
    """One thread, fixed seeds, deterministic kernels: the same bits on every run, so expected
    outputs written in tests stay true. Restores torch's settings afterwards."""
    import torch

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(strict)
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# tokenizers


def _holds_whole_non_ascii(token: str, byte_of: dict[str, int]) -> bool:
    """Whether a byte-level token holds a complete non-ASCII character (its partial bytes decode to
    nothing under errors='ignore')."""
    text = bytes(byte_of[c] for c in token).decode("utf-8", errors="ignore")
    return any(ord(c) > 127 for c in text)


def _bytelevel_bpe(texts: list[str], merges: int) -> tuple[list[str], list[tuple[str, str]]]:
    """A byte-level BPE trained in plain Python with ties broken by the pair itself, so the same
    on every run. No merge makes a token that holds a whole non-ASCII character: every Korean
    character spans two or three tokens, and streaming must hold back half-characters."""
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    # the GPT-2 byte <-> printable-character table (bytes_to_unicode), inverted
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    byte_of = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            byte_of[chr(256 + extra)] = b
            extra += 1
    words: Counter[tuple[str, ...]] = Counter()
    for text in texts:
        words.update(tuple(piece) for piece, _ in pre.pre_tokenize_str(text))
    learnt: list[tuple[str, str]] = []
    while len(learnt) < merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in pairwise(word):
                pairs[pair] += count
        ranked = sorted(pairs, key=lambda pair: (-pairs[pair], pair))
        best = next((pair for pair in ranked if not _holds_whole_non_ascii(pair[0] + pair[1], byte_of)), None)
        if best is None:
            break
        learnt.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return [*alphabet, *(a + b for a, b in learnt)], learnt


def _bytelevel_tokenizer(specials: list[str], trailing: list[str], vocab_size: int):
    """A byte-level BPE Tokenizer: specials first, the 256 byte symbols, merges, then trailing."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokens, merges = _bytelevel_bpe(NEWS, vocab_size - len(specials) - len(trailing) - 256)
    vocab = {token: i for i, token in enumerate([*specials, *tokens, *trailing])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([*specials, *trailing])
    return tok


def gpt2_tokenizer(directory: Path, vocab_size: int = 400):
    """GPT-2's layout: byte-level BPE, one special token <|endoftext|> (bos, eos and unk), no pad."""
    from tokenizers import processors
    from transformers import GPT2TokenizerFast

    tok = _bytelevel_tokenizer([GPT2_EOS], [], vocab_size)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = GPT2TokenizerFast(
        tokenizer_object=tok, bos_token=GPT2_EOS, eos_token=GPT2_EOS, unk_token=GPT2_EOS, model_max_length=128
    )
    fast.save_pretrained(directory)
    return fast


def bart_tokenizer(directory: Path, vocab_size: int = 400):
    """BART's layout: byte-level BPE, <s>=0 <pad>=1 </s>=2 <unk>=3, <mask> last, <s> $A </s>."""
    from tokenizers import processors
    from transformers import BartTokenizerFast

    tok = _bytelevel_tokenizer(BART_SPECIALS, ["<mask>"], vocab_size)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True)
    fast = BartTokenizerFast(tokenizer_object=tok, model_max_length=128)
    fast.save_pretrained(directory)
    return fast


def _t5_texts() -> list[str]:
    return [T5_PREFIX, *DICTIONARY, *DICTIONARY.values()]


def t5_tokenizer(directory: Path):
    """T5's layout: a sentencepiece-like Unigram over Metaspace pieces, <pad>=0 </s>=1 <unk>=2,
    $A </s>. Pieces: every word of the task as one piece, its characters and printable ASCII as
    fallbacks (so only other scripts' characters become <unk>), scored by frequency in plain Python
    (no trainer, so no run-to-run ties)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    counts: Counter[str] = Counter()
    for text in _t5_texts():
        for word in text.split():
            counts["▁" + word] += 1
            counts.update(word)
    counts.update(["▁", *(chr(c) for c in range(33, 127))])
    total = sum(counts.values())

    pieces = [(s, 0.0) for s in T5_SPECIALS]
    pieces += [(p, math.log(c / total)) for p, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    tok = Tokenizer(models.Unigram(pieces, unk_id=T5_SPECIALS.index("<unk>")))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", T5_SPECIALS.index("</s>"))]
    )
    tok.add_special_tokens(T5_SPECIALS)
    fast = T5TokenizerFast(tokenizer_object=tok, extra_ids=0, model_max_length=128)
    fast.save_pretrained(directory)
    return fast


# ---------------------------------------------------------------------------------------------
# training


def _train(model, batches: Callable[[int], list[dict]], steps: int, lr: float) -> float:
    """AdamW for `steps` steps; step i accumulates the gradients of batches(i), weighted by their
    label tokens, as one batch would (length buckets waste less on padding). Returns the last loss."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, 1.0 - 0.9 * step / steps)
    )
    model.train()
    total = 0.0
    for step in range(steps):
        optimizer.zero_grad()
        parts = batches(step)
        tokens = [int((part["labels"] != -100).sum()) for part in parts]
        total = 0.0
        for part, count in zip(parts, tokens, strict=True):
            loss = model(**part).loss * (count / sum(tokens))
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    model.eval()
    return total


def _buckets(tokenizer, sources: list[str], targets: list[str] | None = None, size: int = 16) -> list[dict]:
    """Training batches of `size` examples of similar length: causal-LM batches (labels = the
    input) without targets, seq2seq batches with them. Padding is masked out of the loss."""
    import torch

    order = sorted(range(len(sources)), key=lambda i: (len(tokenizer(sources[i])["input_ids"]), i))
    parts = []
    for start in range(0, len(order), size):
        chosen = order[start : start + size]
        batch = dict(tokenizer([sources[i] for i in chosen], padding=True, return_tensors="pt"))
        if targets is None:  # padding is on the right, where causal attention never looks back
            labels = batch["input_ids"], batch.pop("attention_mask")
        else:
            target = tokenizer(text_target=[targets[i] for i in chosen], padding=True, return_tensors="pt")
            labels = target["input_ids"], target["attention_mask"]
        parts.append({**batch, "labels": torch.where(labels[1].bool(), labels[0], -100)})
    return parts


def build_gpt2(directory: Path, steps: int = 150) -> Path:
    """GPT-2 that continues the NEWS titles greedily and then says <|endoftext|>."""
    import transformers

    directory.mkdir(parents=True, exist_ok=True)
    with _deterministic():
        tokenizer = gpt2_tokenizer(directory)
        eos = tokenizer.eos_token_id
        config = transformers.GPT2Config(
            vocab_size=len(tokenizer), **GPT2_SIZE, bos_token_id=eos, eos_token_id=eos,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
        model = transformers.GPT2LMHeadModel(config)
        tokenizer.pad_token = tokenizer.eos_token  # only to batch here; the saved tokenizer has none
        parts = _buckets(tokenizer, [text + GPT2_EOS for text in NEWS])
        _train(model, lambda step: parts, steps, lr=1e-2)
        model.generation_config = transformers.GenerationConfig(
            bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, do_sample=False, max_length=GPT2_SIZE["n_positions"]
        )
        model.save_pretrained(directory)
    return directory


def _story(lead: str, rng: random.Random) -> str:
    """A "story": lead, then another NEWS title."""
    return f"{lead} {rng.choice([t for t in NEWS if t != lead])}"


def _summary(lead: str) -> str:
    return " ".join(lead.split()[:SUMMARY_WORDS])


def build_bart(directory: Path, steps: int = 100) -> Path:
    """BART that "summarises" a story as the first SUMMARY_WORDS words of its first sentence."""
    import transformers

    directory.mkdir(parents=True, exist_ok=True)
    with _deterministic():
        tokenizer = bart_tokenizer(directory)
        ids = {"bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2}
        config = transformers.BartConfig(
            vocab_size=len(tokenizer), d_model=64, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
            max_position_embeddings=128, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
            decoder_start_token_id=2, forced_bos_token_id=0, forced_eos_token_id=2, **ids,
        )  # fmt: skip
        model = transformers.BartForConditionalGeneration(config)
        rng = random.Random(0)
        # a fresh second sentence every epoch; labels <s> summary </s>, which the model shifts right
        # behind decoder_start_token_id (</s>)
        epochs = [_buckets(tokenizer, [_story(t, rng) for t in NEWS], [_summary(t) for t in NEWS]) for _ in range(8)]
        _train(model, lambda step: epochs[step % len(epochs)], steps, lr=1e-2)
        model.generation_config = transformers.GenerationConfig(
            **ids, decoder_start_token_id=2, forced_bos_token_id=0, forced_eos_token_id=2,
            do_sample=False, num_beams=1, max_length=32,
        )  # fmt: skip
        model.save_pretrained(directory)
    return directory


def _t5_pairs(count: int, rng: random.Random) -> tuple[list[str], list[str]]:
    """Random [adjective] noun [verb] sentences and their word-by-word translations; half of the
    sources carry T5_PREFIX, so the model translates with or without it."""
    sources, targets = [], []
    for i in range(count):
        words = [rng.choice(list(ADJECTIVES))] if rng.random() < 0.6 else []
        words.append(rng.choice(list(NOUNS)))
        words += [rng.choice(list(VERBS))] if rng.random() < 0.6 else []
        sources.append((T5_PREFIX if i % 2 else "") + " ".join(words))
        targets.append(" ".join(DICTIONARY[w] for w in words))
    return sources, targets


def build_t5(directory: Path, steps: int = 150) -> Path:
    """T5 that translates [adjective] noun [verb] sentences into Korean, word by word."""
    import transformers

    directory.mkdir(parents=True, exist_ok=True)
    with _deterministic():
        tokenizer = t5_tokenizer(directory)
        config = transformers.T5Config(
            vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
            num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32,
            dropout_rate=0.0, feed_forward_proj="relu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
            task_specific_params={"translation_en_to_ko": {"prefix": T5_PREFIX}},
        )  # fmt: skip
        model = transformers.T5ForConditionalGeneration(config)
        rng = random.Random(0)
        # new random sentences every step: the model learns the word map, not a list of sentences
        _train(model, lambda step: _buckets(tokenizer, *_t5_pairs(32, rng), size=32), steps, lr=1e-2)
        model.generation_config = transformers.GenerationConfig(
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, do_sample=False, num_beams=1, max_length=32
        )
        model.save_pretrained(directory)
    return directory


# Qwen2-Instruct's chat template, as Qwen/Qwen2-0.5B-Instruct's tokenizer config carries it
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def qwen2_chat(title: str) -> list[dict[str, str]]:
    """The conversation the tiny Qwen2 learns: the user gives a title's first two words, the
    assistant the rest of it."""
    words = title.split()
    return [{"role": "user", "content": " ".join(words[:2])}, {"role": "assistant", "content": " ".join(words[2:])}]


def qwen2_tokenizer(directory: Path, vocab_size: int = 420):
    """Qwen2's layout: byte-level BPE, <|endoftext|> (pad), <|im_start|> and <|im_end|> (eos), no bos,
    and Qwen2-Instruct's chat template."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=_bytelevel_tokenizer(QWEN2_SPECIALS, [], vocab_size),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=QWEN2_SPECIALS[1:],
        model_max_length=128,
        chat_template=QWEN2_CHAT_TEMPLATE,
    )
    fast.save_pretrained(directory)
    return fast


def build_qwen2(directory: Path, steps: int = 150) -> Path:
    """A Qwen2 (the Llama family's layout: RMSNorm, rotary positions, grouped-query attention) that
    answers a chat: given a title's first two words, it says the rest and ends its turn."""
    import transformers

    directory.mkdir(parents=True, exist_ok=True)
    with _deterministic():
        tokenizer = qwen2_tokenizer(directory)
        end, pad = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
        config = transformers.Qwen2Config(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
            bos_token_id=None, eos_token_id=end, pad_token_id=pad,
        )  # fmt: skip
        model = transformers.Qwen2ForCausalLM(config)
        chats = [tokenizer.apply_chat_template(qwen2_chat(title), tokenize=False) for title in NEWS]
        _train(model, lambda step: _buckets(tokenizer, chats), steps, lr=1e-2)
        model.generation_config = transformers.GenerationConfig(
            eos_token_id=[end, pad], pad_token_id=pad, do_sample=False, max_length=128
        )
        model.save_pretrained(directory)
    return directory


BUILDERS = {"gpt2": build_gpt2, "bart": build_bart, "t5": build_t5, "qwen2": build_qwen2}
SAMPLES = {
    "gpt2": ("text-generation", ["Scientists discover", "부산에서 국제"]),
    "bart": ("summarization", [f"{NEWS[2]} {NEWS[7]}", f"{NEWS[36]} {NEWS[0]}"]),
    "t5": ("translation_en_to_ko", ["red apple", "happy bird sings"]),
    "qwen2": (
        "text-generation",
        [[{"role": "user", "content": "Seoul stocks"}], [{"role": "user", "content": "부산에서 국제"}]],
    ),
}


if __name__ == "__main__":  # python tests/tiny_generators.py DIR: build all three, show greedy outputs
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import pipeline

    root = Path(sys.argv[1])
    for name, build in BUILDERS.items():
        start = time.perf_counter()
        build(root / name)
        took = time.perf_counter() - start
        task, prompts = SAMPLES[name]
        generate = pipeline(task, model=str(root / name), device="cpu")
        print(f"{name}: built in {took:.1f} s")
        for prompt in prompts:
            print(f"  {prompt!r} -> {generate(prompt, do_sample=False)[0]}")
