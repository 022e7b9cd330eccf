"""The split a training run recorded (``RUN/split.json``), read back to predict exactly its cases.

`medseg.training.loop` writes split.json when a run starts: the case ids that trained and
the ones that validated, with the split mode, fold and seed. `medseg predict --split val`
reads it here so the cases predicted are the ones the run held out, whatever the data
source or the config say today. The file is input like any other: its size, shape and
ids are checked, and every problem is one sentence naming the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from medseg.errors import MedsegError

__all__ = ["ROLES", "SPLIT_FILE", "RecordedSplit", "SplitRecordError", "read_split"]

SPLIT_FILE = "split.json"
ROLES = ("train", "val")
_MAX_BYTES = 16 << 20  # a million case ids; a larger file is not a split medseg wrote
_MAX_ID = 512


class SplitRecordError(MedsegError):
    """A run folder has no usable split.json, or names a role or case it does not record."""


@dataclass(frozen=True)
class RecordedSplit:
    """The case ids of each role of one run, as its split.json recorded them."""

    path: Path
    roles: dict[str, tuple[str, ...]]
    fold: int | None = None

    def cases(self, role: str) -> tuple[str, ...]:
        """The case ids of ``role`` ('train' or 'val'); an unknown role is one sentence."""
        if role not in self.roles:
            raise SplitRecordError(
                f"{self.path}: records no {role!r} cases; it records {', '.join(self.roles)} (use --split with one "
                "of them, or name cases with --cases)"
            )
        return self.roles[role]


def read_split(run_dir: Path) -> RecordedSplit:
    """Read and check ``run_dir/split.json``."""
    path = Path(run_dir) / SPLIT_FILE
    fix = "it is not the file `medseg train` wrote; retrain the run, or name the cases with --cases"
    try:
        with path.open("rb") as handle:
            data = handle.read(_MAX_BYTES + 1)
    except FileNotFoundError:
        raise SplitRecordError(
            f"{run_dir}: no {SPLIT_FILE}, so which cases trained and which validated is not known (a run "
            "trained by an older medseg, or not a run folder); train it again, or name the cases with --cases"
        ) from None
    except OSError as exc:
        raise SplitRecordError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if len(data) > _MAX_BYTES:
        raise SplitRecordError(f"{path}: larger than {_MAX_BYTES >> 20} MB; {fix}")
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SplitRecordError(f"{path}: not valid JSON ({exc}); {fix}") from None
    if not isinstance(raw, dict):
        raise SplitRecordError(f"{path}: holds {type(raw).__name__}, not a record of roles; {fix}")
    roles: dict[str, tuple[str, ...]] = {}
    owner: dict[str, str] = {}
    for role in ROLES:
        ids = raw.get(role)
        if not isinstance(ids, list) or not all(isinstance(i, str) and 0 < len(i) <= _MAX_ID for i in ids):
            raise SplitRecordError(f"{path}: {role!r} is not a list of case ids; {fix}")
        for case in ids:
            if case in owner:
                raise SplitRecordError(f"{path}: case {case!r} is listed under {owner[case]!r} and {role!r}; {fix}")
            owner[case] = role
        roles[role] = tuple(ids)
    fold = raw.get("fold")
    return RecordedSplit(path, roles, fold if isinstance(fold, int) and not isinstance(fold, bool) else None)
