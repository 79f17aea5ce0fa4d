"""Import time and resident memory: kiln's runtime against a `transformers` pipeline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

# VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so a child started by a big
# parent would report the parent's peak
PROBE = """
import json, sys, time
start = time.perf_counter()
{imports}
imported = time.perf_counter()
{load}
loaded = time.perf_counter()
pipe(["warm up text"])
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({{"import_s": imported - start, "load_s": loaded - imported, "max_rss_mb": peak_kb / 1024}}))
"""


def _probe(imports: str, load: str) -> dict[str, float]:
    code = PROBE.format(imports=imports, load=load)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_footprint(package: Path, source: Path, task: str) -> list[dict]:
    kiln = _probe("from kiln.runtime import pipeline", f"pipe = pipeline({str(package)!r})")
    hf_task = "feature-extraction" if task == "feature-extraction" else "text-classification"
    transformers = _probe(
        "from transformers import pipeline", f"pipe = pipeline({hf_task!r}, model={str(source)!r}, device='cpu')"
    )
    return [{"engine": "kiln runtime", **kiln}, {"engine": "transformers pipeline (PyTorch)", **transformers}]
