"""A generator's KV cache through numpy every step against kept where the session made it (IO
binding, `SessionOptions.kv_on_device`), side by side in alternating rounds, with a check that both
give the same text:

    python -m kiln.bench.kv_cache PACKAGE --corpus FILE [--provider cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from kiln.bench.stats import ROUNDS
from kiln.runtime import SessionOptions
from kiln.runtime.generation.package import load_generator
from kiln.runtime.tasks import spec_for


def measure(package: Path, prompts: list[str], provider: str, new_tokens: int = 32) -> dict[str, dict[int, float]]:
    """Median tokens/s of each path at one stream (prompts one after another) and 8 (batched)."""
    pipes = {}
    for name, on_device in (("numpy every step", False), ("kept on the device", True)):
        generator = load_generator(package, SessionOptions(provider=provider, kv_on_device=on_device))
        pipes[name] = spec_for(generator.manifest.task).pipeline(generator, batch_size=64)
    greedy = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    rates: dict[str, dict[int, list[float]]] = {name: {1: [], 8: []} for name in pipes}
    answers: dict[str, list] = {}
    for _ in range(ROUNDS):
        for name, pipe in pipes.items():
            start = time.perf_counter()
            alone = [pipe(prompt, **greedy) for prompt in prompts[:2]]
            rates[name][1].append(2 * new_tokens / (time.perf_counter() - start))
            start = time.perf_counter()
            batched = pipe(prompts[:8], **greedy)
            rates[name][8].append(8 * new_tokens / (time.perf_counter() - start))
            answers[name] = [alone, batched]
    first, second = answers.values()
    if first != second:
        raise SystemExit("the two paths gave different text")
    return {name: {streams: statistics.median(r) for streams, r in by.items()} for name, by in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("package", type=Path)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--provider", default="cpu")
    args = parser.parse_args()
    prompts = [line.strip() for line in args.corpus.read_text(encoding="utf-8").splitlines() if line.strip()][:8]
    for name, by in measure(args.package, prompts, args.provider).items():
        print(f"{name}: " + ", ".join(f"{streams} streams {rate:.1f} tokens/s" for streams, rate in by.items()))
    print("same text on both paths")


if __name__ == "__main__":
    main()
