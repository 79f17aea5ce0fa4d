"""The README's client snippets, run as written against a real server (tiny packages served as
`ynat` and `minilm`, on free ports put in place of 8000 and 8001). The quick start's export and
container lines are not run here: the export needs the Hub (tests/test_export.py exports local
models the same way) and no container engine runs on these machines (tests/test_deploy.py checks
the Dockerfile and its command line)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from kiln.bench import perf_analyzer
from servers import running_server

README = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")


def snippet(name: str) -> tuple[str, str]:
    """(language, code) of the fenced block after `<!-- snippet: name -->`."""
    found = re.search(rf"<!-- snippet: {name} -->\n```(\w+)\n(.*?)```", README, re.S)
    assert found, f"README has no snippet {name!r}"
    return found.group(1), found.group(2)


@pytest.fixture(scope="module")
def server(task_packages):
    with running_server(models={"ynat": task_packages["cls"], "minilm": task_packages["emb"]}) as running:
        yield running


def run(name: str, server, timeout: float = 300, retry_when: str | None = None) -> str:
    """The snippet's output; run again (three tries in all) while its failure says `retry_when`."""
    language, code = snippet(name)
    code = code.replace("localhost:8001", server.address).replace("localhost:8000", server.http.split("://")[1])
    command = [sys.executable, "-c", code] if language == "python" else ["bash", "-euo", "pipefail", "-c", code]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for _ in range(3):
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        if done.returncode == 0 or retry_when is None or retry_when not in done.stdout + done.stderr:
            break
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_tritonclient(server):
    labels = run("tritonclient", server)
    assert labels.count("b'") >= 2  # two labels (and their scores)


def test_curl(server):
    reply = json.loads(run("curl", server))
    assert reply["model_name"] == "ynat" and {o["name"] for o in reply["outputs"]} >= {"label", "score"}


def test_openai(server):
    assert "prompt_tokens" in run("openai", server)


@pytest.mark.skipif(perf_analyzer.unusable() is not None, reason=str(perf_analyzer.unusable()))
def test_perf_analyzer(server):
    # perf_analyzer wants three 5 s windows within 10% of each other: a shared CI machine's noise can
    # deny it that (it says so and exits 2), which says nothing of kiln; a real failure fails every try
    assert "throughput" in run("perf_analyzer", server, retry_when="Failed to obtain stable measurement")


@pytest.mark.skipif(shutil.which("grpcurl") is None, reason="grpcurl is not installed here")
def test_grpcurl(server):
    assert "labels" in run("grpcurl", server)
