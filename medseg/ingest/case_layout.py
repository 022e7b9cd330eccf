"""The per-image instance layout of the Kaggle Data Science Bowl 2018, recognised from folders alone.

A case folder holds ``images/`` with exactly one image and a ``masks/`` folder with one
binary mask per object. That shape is unambiguous; an ``images/`` folder holding several
images is the other common layout (``images/X`` paired with ``masks/X`` by name), which is
not this one. ``medseg.ingest.discover`` asks ``CaseLayout`` which files belong to a case.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from medseg.ingest.sniff import suffix_of

__all__ = ["CaseLayout", "is_layout_case"]


class CaseLayout:
    """Which folders form per-image cases (``CASE/images`` with one image + ``CASE/masks``), and their files."""

    def __init__(self, root: Path | None, image_suffixes: Sequence[str]) -> None:
        self.root = root
        self.image_suffixes = tuple(image_suffixes)
        self.cases: dict[Path, bool] = {}
        self.files: dict[Path, dict[str, list[Path]]] = defaultdict(lambda: {"images": [], "masks": []})

    def is_case(self, folder: Path) -> bool:
        if folder not in self.cases:
            self.cases[folder] = is_layout_case(folder, self.image_suffixes)
        return self.cases[folder]

    def part_of(self, path: Path) -> tuple[Path, str] | None:
        """(case folder, "images" or "masks") for a file directly in a case's images/ or masks/ below the root."""
        part = path.parent.name.lower()
        case = path.parent.parent
        if self.root is None or part not in ("images", "masks"):
            return None
        if case != self.root and self.root not in case.parents:
            return None  # the root is inside the case (e.g. CASE/masks): no image to attach masks to
        return (case, part) if self.is_case(case) else None

    def is_masks_folder(self, folder: Path) -> bool:
        """A case's masks/ folder, even when discovery starts inside it: its masks never stack."""
        return folder.name.lower() == "masks" and self.is_case(folder.parent)


def is_layout_case(folder: Path, image_suffixes: Sequence[str]) -> bool:
    """Whether ``folder`` holds ``images/`` with exactly one image (by suffix) and a ``masks/`` folder."""
    try:
        children = {entry.name.lower(): entry for entry in os.scandir(folder) if entry.is_dir(follow_symlinks=False)}
        if "images" not in children or "masks" not in children:
            return False
        images = [
            entry
            for entry in os.scandir(children["images"].path)
            if not entry.name.startswith(".") and entry.is_file() and suffix_of(Path(entry.name)) in image_suffixes
        ]
    except OSError:
        return False
    return len(images) == 1
