"""Pieces the hostile corpus's case builders share: the predict command line, a finished batch, a user's files."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path


from hostile_corpus.checker import World
from medseg.files import JOURNAL_DIR, TMP_MARKER


COMMANDS = ("predict", "evaluate", "train", "view", "data", "info", "config", "demo")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def predict(w: World, *extra: str, inputs: Path | None = None, out: Path | None = None, ckpt=None) -> list[str]:
    inputs, out = inputs or w.inputs, out or w.out
    return ["predict", "--checkpoint", str(ckpt or w.model), "--input", str(inputs), "--output", str(out), *extra]


def went_on(w: World, *masks: str, out: Path | None = None):
    """The batch went on: these masks are written, predictions.json and the review page too."""
    out = out or w.out

    def check_masks() -> None:
        for name in masks:
            assert (out / name).is_file(), f"{name} was not written: {sorted(p.name for p in out.iterdir())}"
        assert json.loads((out / "predictions.json").read_text())["records"]
        assert (out / "review.html").is_file()

    return check_masks


def plant_user_files(folder: Path) -> list[Path]:
    """Files a user keeps in an output folder that look like litter: none is medseg's to delete."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        ".thesis.partial.docx": b"a thesis in progress",
        ".a.nii.gz.x.part.nii.gz": b"looks like a partial download",
        f"notes{TMP_MARKER}.txt": b"carries medseg's marker, but no journal names it",
        "notes.txt": b"plain notes",
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return [folder / name for name in files]


def dead_pid() -> int:
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def journal(out: Path, token: str, tmp: str, pid: int) -> Path:
    folder = out / JOURNAL_DIR
    folder.mkdir(parents=True, exist_ok=True)
    entry = folder / f"{token}.json"
    entry.write_text(json.dumps({"tmp": tmp, "pid": pid, "host": socket.gethostname()}))
    return entry


def sha256_of(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def tiny_train_yaml(w: World, name: str, out: Path | None = None, steps: int = 2, epochs: int = 1) -> str:
    return (
        f"name: {name}\n"
        f"data: {{images: {w.inputs / 'images'}, labels: {w.inputs / 'labels'}, classes: {{membrane: 0, cell: 255}},"
        " split: {mode: cases, train: [s0, s1, s2, s3], val: [s4]}}\n"
        "model: {name: unet, spatial_dims: 2, features: 4, depth: 2}\naugment: {enabled: false}\n"
        f"train: {{epochs: {epochs}, steps_per_epoch: {steps}, batch_size: 2, patch_size: [32, 32]}}\n"
        f"output_dir: {out or w.out}\n"
    )


def finished_batch(w: World) -> None:
    """A finished batch in w.out (predictions, masks, page), made by medseg itself."""
    from medseg.inference.predictor import Predictor
    from medseg.pipeline import segment_folder

    segment_folder(Predictor(w.model), w.inputs, w.out, progress=False)
