"""The text an export is checked and calibrated on: the user's file, else a built-in mixed set."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from kiln.runtime.errors import CalibrationError


def read_texts(path: str | Path) -> list[str]:
    """Read one example a line; a missing, unreadable or empty file is an error that names it."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"calibration file {path} cannot be read as UTF-8 text: {exc}") from exc
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise CalibrationError(f"calibration file {path} is empty (expected one text a line)")
    return texts


def builtin_texts() -> list[str]:
    """English and Korean sentences of many lengths, shipped with kiln for offline checks."""
    source = resources.files("kiln.export").joinpath("data/validation.txt")
    return [line.strip() for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
