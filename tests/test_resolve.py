"""Hub ids resolve through huggingface_hub's real cache, offline, against a cache layout we write."""

from __future__ import annotations

import shutil

from conftest import run_kiln
from kiln.runtime.manifest import read_manifest

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_hub_cache(hf_home, repo_id: str, model_dir) -> None:
    """The layout huggingface_hub itself writes: blobs are skipped, files sit in the snapshot."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(model_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)


def test_export_from_hub_id_offline(tiny_model, tmp_path):
    hf_home = tmp_path / "hf"
    write_hub_cache(hf_home, "someone/roberta-ynat", tiny_model("roberta", "text-classification"))
    out = tmp_path / "pkg"
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home)}
    result = run_kiln("export", "--model", "someone/roberta-ynat", "--quantize", "int8", "--output", str(out), env=env)
    assert result.returncode == 0, result.stderr
    source = read_manifest(out).source
    assert source["model_id"] == "someone/roberta-ynat"
    assert source["commit"] == COMMIT
    assert "[ resolve]" in result.stderr and "[validate]" in result.stderr
    assert "held-out items" in result.stdout and "95% lower bound" in result.stdout


def test_unknown_revision_offline(tiny_model, tmp_path):
    hf_home = tmp_path / "hf"
    write_hub_cache(hf_home, "someone/bert", tiny_model("bert", "text-classification"))
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home)}
    result = run_kiln("export", "--model", "someone/bert", "--revision", "v9", "--output", str(tmp_path / "o"), env=env)
    assert result.returncode == 3
    assert "someone/bert" in result.stderr
