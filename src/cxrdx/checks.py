"""Checks every command runs on its output paths before doing any work: one-line CxrdxErrors.

A path is writable when its nearest existing ancestor is a folder where a file can be created (tried
with an anonymous temporary file, so read-only mounts and permissions are both caught, whoever runs).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from cxrdx.errors import CxrdxError


def check_output_file(path: str | Path, what: str) -> Path:
    """`path` can be written as a file: not a folder, and its folder exists or can be created, writably.
    `what` names the option in the message, e.g. "--out"."""
    path = Path(path)
    if path.is_dir():
        raise CxrdxError(f"{what} {path}: is a folder; give a file name (e.g. {path / 'out'})")
    _check_creatable(path.parent, path, what)
    return path


def check_output_dir(path: str | Path, what: str) -> Path:
    """`path` is a writable folder, or one that can be created."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CxrdxError(f"{what} {path}: is a file; give a folder")
    _check_creatable(path, path, what)
    return path


def _check_creatable(folder: Path, target: Path, what: str) -> None:
    existing = folder
    while not existing.exists():
        if existing.is_symlink():
            raise CxrdxError(f"{what} {target}: {existing} is a broken link")
        existing = existing.parent
    if not existing.is_dir():
        raise CxrdxError(f"{what} {target}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise CxrdxError(f"{what} {target}: cannot write in {existing} ({exc.strerror or exc})") from None


def check_positive(value: float, what: str) -> None:
    """A count or size that must be at least 1 (ints) or above 0 (floats), and finite."""
    if not _finite(value) or value <= 0 or (isinstance(value, int) and value < 1):
        raise CxrdxError(f"{what} must be a positive number, got {value}")


def check_nonnegative(value: float, what: str) -> None:
    if not _finite(value) or value < 0:
        raise CxrdxError(f"{what} must be zero or more, got {value}")


def check_range(value: float, what: str, low: float, high: float) -> None:
    """low <= value <= high, finite."""
    if not _finite(value) or not low <= value <= high:
        raise CxrdxError(f"{what} must lie in [{low:g}, {high:g}], got {value}")


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
