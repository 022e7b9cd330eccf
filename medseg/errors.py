"""Exceptions a user can act on: each names the file, the problem and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable


class MedsegError(Exception):
    """Base of every error medseg raises on purpose."""


class ConfigError(MedsegError):
    """A config file (or a --set override) is invalid."""


class ManifestError(MedsegError):
    """data_manifest.csv is invalid, or a dataset file is missing or corrupt."""


class ScanError(MedsegError):
    """A scan (or one of its files) cannot be read as medseg needs it.

    ``paths`` are the files involved, ``problem`` says what is wrong and ``fix`` what the
    user can do about it; ``str()`` joins all three so a log line is enough to act on.
    """

    def __init__(self, paths: Path | str | Iterable[Path | str], problem: str, fix: str = "") -> None:
        if isinstance(paths, (str, Path)):
            paths = [paths]
        self.paths = [Path(p) for p in paths]
        self.problem = problem
        self.fix = fix
        super().__init__(self._message())

    def _message(self) -> str:
        shown = ", ".join(str(p) for p in self.paths[:3])
        if len(self.paths) > 3:
            shown += f" (and {len(self.paths) - 3} more files)"
        text = f"{shown}: {self.problem}" if shown else self.problem
        return f"{text}. {self.fix}" if self.fix else text


class LabelError(ScanError):
    """A label (reference mask) does not match its image or its declared classes."""


class ExportError(MedsegError):
    """A mask could not be written, or did not read back as the scan's geometry."""
