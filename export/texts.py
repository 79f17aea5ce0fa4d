"""The text an export is calibrated and validated on, kept apart.

A gate that validates on the text that calibrated (or tuned) a quantised graph says 1.000 where
held-out text says 0.988 (measured here), so the two never mix: the calibration part sets scales and
chooses what stays in float; the validation part — a `--validation` file, else the texts of the
calibration file the calibration part did not take — is what the gate's figures and thresholds are
checked on, as many items as `--validation-items` allows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from kiln.runtime.errors import CalibrationError

CALIBRATION_ITEMS = 64  # calibration (and the int8 ladder's tuning) needs no more


@dataclass
class TextSplit:
    calibration: list[str]
    validation: list[str]
    source: str  # where the validation texts come from, for the manifest

    def record(self) -> dict[str, object]:
        return {"calibration_items": len(self.calibration), "validation_items": len(self.validation),
                "validation_source": self.source}  # fmt: skip


def read_texts(path: str | Path) -> list[str]:
    """Read one example a line; a missing, unreadable or empty file is an error that names it."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"text file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"text file {path} cannot be read as UTF-8 text: {exc}") from exc
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise CalibrationError(f"text file {path} is empty (expected one text a line)")
    return texts


def builtin_texts() -> list[str]:
    """English and Korean sentences of many lengths, shipped with kiln for offline checks."""
    source = resources.files("kiln.export").joinpath("data/validation.txt")
    return [line.strip() for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]


def split_texts(calibration: Path | None, validation: Path | None, max_validation: int, calibrates: bool) -> TextSplit:
    """Calibration and validation texts, disjoint. Without a --validation file the calibration texts
    are shuffled (fixed seed) and split: up to CALIBRATION_ITEMS, at most half, calibrate; the rest
    validate. With a --validation file alone the same split is made of it: text like the model's
    traffic calibrates better than kiln's built-in sentences, which are off-topic for most models (a
    topic classifier calibrated on them kept 31 of 36 MatMuls in float, on 64 of its own kind of
    sentences 4). A precision that calibrates nothing (fp32, fp16) validates on every text."""
    if validation is not None and calibration is None and calibrates:
        return _held_out(list(dict.fromkeys(read_texts(validation))), str(validation), max_validation)
    texts = list(dict.fromkeys(read_texts(calibration) if calibration else builtin_texts()))
    what = str(calibration) if calibration else "kiln's built-in sentences"
    if validation is not None:
        own = list(dict.fromkeys(read_texts(validation)))
        held = [t for t in own if t not in set(texts)]  # never validate on a text that calibrated
        if not held:
            raise CalibrationError(f"--validation {validation}: every text in it is also a calibration text")
        return TextSplit(
            texts[:CALIBRATION_ITEMS], held[:max_validation], f"{validation} (its texts not calibrated on)"
        )
    if not calibrates:
        return TextSplit(texts[:CALIBRATION_ITEMS], texts[:max_validation], f"{what} (nothing calibrated)")
    return _held_out(texts, what, max_validation)


def _held_out(texts: list[str], what: str, max_validation: int) -> TextSplit:
    """Shuffled with a fixed seed: up to CALIBRATION_ITEMS (at most half) calibrate, the rest validate."""
    if len(texts) < 4:
        raise CalibrationError(f"{what}: {len(texts)} texts cannot be split into calibration and validation")
    shuffled = random.Random(0).sample(texts, len(texts))
    cut = min(CALIBRATION_ITEMS, len(shuffled) // 2)
    return TextSplit(shuffled[:cut], shuffled[cut : cut + max_validation], f"{what}, held out from calibration")
