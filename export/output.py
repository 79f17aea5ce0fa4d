"""The output directory as a transaction: everything is built in a hidden scratch directory beside
the output and renamed into place only when the package passed its gate; a failure leaves nothing."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kiln.runtime.errors import OutputError


def check_output(output: Path, force: bool) -> None:
    if output.exists() and not force:
        raise OutputError(f"{output} already exists; pass --force to replace it")
    if output.exists() and not output.is_dir():
        raise OutputError(f"{output} exists and is not a directory")


@contextmanager
def scratch_dir(output: Path) -> Iterator[Path]:
    """A scratch directory on the output's filesystem (so the final rename is atomic), removed after."""
    parent = output.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=parent))
    except OSError as exc:
        raise OutputError(f"cannot write to {parent}: {exc.strerror or exc}") from exc
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def move_into_place(package_dir: Path, output: Path) -> None:
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        output.rename(old)
    package_dir.rename(output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
