"""Class 9 of issue #15: SIGINT and SIGTERM stop a command cleanly (each case in a process of its own)."""

from __future__ import annotations

import signal
import socket
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import em_nifti_scans, one_file_manifest, write_em_pairs
from hostile_corpus.checker import Case, Run, World
from hostile_corpus.common import finished_batch, predict, tiny_train_yaml
from medseg.data import phantoms
from medseg.files import TMP_MARKER


# ============================================================================ 9. signals

EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


def predict_stopped(sig: signal.Signals):
    def build(w: World) -> Run:
        em = phantoms.em_phantom(shape=(64, 64, 60), cells=8, seed=8)
        for k in range(60):  # a letter after the number: sixty scans, not one stack
            Image.fromarray(np.ascontiguousarray(em.image[:, :, k].T)).save(w.inputs / f"scan_{k:02d}x.png")
        finished = partial(_finished_pngs, w.out)

        def kept_whole() -> None:  # what the hint promises is kept is whole
            assert 1 <= len(finished()) < 60
            assert all(np.asarray(Image.open(p)).shape == (64, 64) for p in finished())

        return Run(
            predict(w),
            w.out,
            EXIT[sig],
            says=("interrupted; rerun the same command to resume", str(w.out)),
            process=True,
            signal=sig,
            ready=lambda: bool(finished()),
            after=kept_whole,
        )

    return build


def _finished_pngs(out: Path) -> list[Path]:
    return [p for p in out.iterdir() if p.suffix == ".png" and not p.name.startswith(".")] if out.is_dir() else []


def train_stopped(sig: signal.Signals):
    def build(w: World) -> Run:

        write_em_pairs(w.inputs, slices=5)
        (w.root / "c.yaml").write_text(tiny_train_yaml(w, "sig", epochs=10000, steps=1))
        run_dir = w.out / "sig"
        return Run(
            ["train", "--config", str(w.root / "c.yaml")],
            w.out,
            EXIT[sig],
            says=(f"interrupted; resume with --resume {run_dir}",),
            process=True,
            signal=sig,
            ready=lambda: (run_dir / "metrics.csv").is_file(),
        )

    return build


def view_stopped(sig: signal.Signals):
    def build(w: World) -> Run:
        em_nifti_scans(w.inputs, ["a"])
        finished_batch(w)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]

        def serving() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                return False

        code, says = (143, "medseg view: stopped (SIGTERM)") if sig == signal.SIGTERM else (0, "Stopped.")
        return Run(
            ["view", str(w.out), "--port", str(port)],
            w.out,
            code,
            says=(says,),
            process=True,
            signal=sig,
            ready=serving,
        )

    return build


def fetch_stopped(w: World) -> Run:
    mirror = w.root / "mirror"
    (mirror / "tiny" / "img").mkdir(parents=True)
    size = 256 * 2**20
    with (mirror / "tiny" / "img" / "a.bin").open("wb") as handle:
        handle.truncate(size)  # sparse: no disk used, still read byte by byte
    m = one_file_manifest(w.root / "m.csv", "", size=size)

    def copying() -> bool:
        return any(TMP_MARKER in p.name for p in w.out.rglob("*")) if w.out.is_dir() else False

    argv = ["data", "fetch", "tiny", "--mirror", str(mirror), "--dest", str(w.out), "--manifest", str(m)]
    return Run(
        argv,
        w.out,
        130,
        says=("interrupted; rerun the same command to resume",),
        process=True,
        signal=signal.SIGINT,
        ready=copying,
    )


SIGNALS = [
    Case("sigterm", 9, "predict", predict_stopped(signal.SIGTERM)),
    Case("sigint", 9, "predict", predict_stopped(signal.SIGINT), slow=True),
    Case("sigint", 9, "train", train_stopped(signal.SIGINT)),
    Case("sigterm", 9, "train", train_stopped(signal.SIGTERM), slow=True),
    Case("sigterm", 9, "view", view_stopped(signal.SIGTERM)),
    Case("sigint", 9, "view", view_stopped(signal.SIGINT), slow=True),
    Case("sigint-mid-copy", 9, "data", fetch_stopped),
]
