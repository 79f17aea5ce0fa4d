"""kiln.json's schema: published beside the format and kept current, strict about types."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kiln.runtime.errors import PackageError
from kiln.runtime.manifest import json_schema, read_manifest

SCHEMA = Path(__file__).parents[1] / "runtime" / "kiln.schema.json"


def test_published_schema_is_current():
    assert SCHEMA.read_text(encoding="utf-8") == json_schema(), (
        "runtime/kiln.schema.json is stale: python -c 'from kiln.runtime.manifest import json_schema; "
        'print(json_schema(), end="")\' > runtime/kiln.schema.json'
    )


def test_an_exported_manifest_passes_and_a_coerced_one_does_not(exported, tmp_path):
    package = exported("bert", "text-classification")
    manifest = read_manifest(package)
    assert manifest.max_sequence_length == 128 and manifest.target == "cpu"
    data = json.loads((package / "kiln.json").read_text())
    data["opset"] = 17.0  # a float where an integer belongs: refused, not rounded
    (tmp_path / "kiln.json").write_text(json.dumps(data))
    with pytest.raises(PackageError, match="field opset"):
        read_manifest(tmp_path)
