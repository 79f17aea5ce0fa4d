"""The install a user (and the Dockerfile) does: build the wheel, install it with the [cpu] extra in a
fresh virtual environment — no PyTorch, no transformers — and serve a package with it, asked over
KServe gRPC. KILN_SMOKE_PYTHON picks the interpreter (CI runs this again with 3.13)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from kiln.runtime import pipeline
from servers import free_port, wait_listening

ROOT = Path(__file__).parents[1]


def interpreter() -> str:
    wanted = os.environ.get("KILN_SMOKE_PYTHON", "")
    if not wanted:
        return sys.executable
    if Path(wanted).is_file():
        return wanted
    found = sorted(Path.home().glob(f".pyenv/versions/{wanted}*/bin/python{wanted}")) or [
        shutil.which(f"python{wanted}")
    ]
    assert found[-1], f"KILN_SMOKE_PYTHON={wanted}: no such interpreter"
    return str(found[-1])


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh environment with the built wheel and its [cpu] extra, and nothing else."""
    work = tmp_path_factory.mktemp("distribution")
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(work / "dist"), str(ROOT)],
                   check=True, capture_output=True)  # fmt: skip
    wheel = next((work / "dist").glob("kiln_serve-*.whl"))
    venv = work / "venv"
    subprocess.run([interpreter(), "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, f"{wheel}[cpu]"], check=True, capture_output=True)
    return venv


def test_the_wheel_installs_without_torch_and_serves(installed, exported):
    python = str(installed / "bin" / "python")
    probe = "import importlib.util as u; print([m for m in ('torch', 'transformers', 'optimum') if u.find_spec(m)])"
    assert subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    assert (installed / "bin" / "kiln").is_file()
    package = exported("bert", "text-classification")
    grpc_port, http_port = free_port(), free_port()
    command = [str(installed / "bin" / "kiln"), "serve", str(package), "--name", "cls",
               "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--metrics-port", "0"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_listening(http_port, process)
        import tritonclient.grpc as tc

        tensor = tc.InferInput("text", [2], "BYTES")
        tensor.set_data_from_numpy(np.array([b"Alice lives in Seoul.", b"Rates rose."], dtype=object))
        result = tc.InferenceServerClient(f"127.0.0.1:{grpc_port}").infer("cls", [tensor])
        local = pipeline(package)
        texts = ["Alice lives in Seoul.", "Rates rose."]
        assert [a.decode() for a in result.as_numpy("label")] == [r["label"] for r in local(texts)]
        # the same onnxruntime on another Python: the same bytes (one text per call, as the server ran them)
        assert np.array_equal(result.as_numpy("logits"), np.concatenate([local.logits([t])[0] for t in texts]))
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_wheel_carries_what_it_needs(installed):
    site = next(installed.glob("lib/python3*/site-packages"))
    assert (site / "kiln" / "runtime" / "kiln.schema.json").is_file()
    assert (site / "kiln" / "proto" / "kiln.proto").is_file()
    metadata = next(site.glob("kiln_serve-*.dist-info")) / "METADATA"
    text = metadata.read_text()
    assert "License-Expression: Apache-2.0" in text and "Requires-Python: >=3.11" in text
    assert 'Requires-Dist: onnxruntime>=1.20; extra == "cpu"' in text
    assert 'Requires-Dist: onnxruntime-gpu>=1.20; extra == "gpu"' in text


def test_the_wheel_carries_kilns_kernels_for_every_python(installed):
    """One cp311-abi3 wheel: the kernels library (it uses no Python API) loads on the newest Python too."""
    python = str(installed / "bin" / "python")
    probe = "from kiln.runtime.native import kernels_library as k; print(k().name if k() else None)"
    assert subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == (
        "_kernels.abi3.so"
    )
