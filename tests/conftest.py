"""Shared fixtures: phantoms on disk and a guard that inputs are never modified."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from medseg import phantoms

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def snapshot(folder: Path) -> dict[str, tuple[str, float, int]]:
    """sha256, mtime and mode of every file below ``folder``."""
    state = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            stat = path.stat()
            state[str(path)] = (hashlib.sha256(path.read_bytes()).hexdigest(), stat.st_mtime_ns, stat.st_mode)
    return state


def open_files() -> set[str]:
    """Paths this process holds open (Linux /proc)."""
    fd_dir = Path("/proc/self/fd")
    found = set()
    for fd in fd_dir.iterdir():
        try:
            found.add(os.readlink(fd))
        except OSError:
            continue
    return found


@pytest.fixture
def ct():
    """Axis-aligned CT phantom."""
    return phantoms.ct_phantom()


@pytest.fixture
def oblique_ct():
    return phantoms.ct_phantom(oblique=(25.0, -15.0, 30.0), seed=3)


@pytest.fixture
def sample_study(tmp_path: Path) -> dict[str, Path]:
    return phantoms.write_sample_study(tmp_path / "study")
