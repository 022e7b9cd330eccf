"""The first-run demo: the whole pipeline on generated data, with nothing downloaded.

phantom study on disk (DICOM series, NIfTI volume, TIFF stack, PNG sequence, reference
masks) → a small 3D model trained on CT phantoms and a small 2D model trained on EM
phantoms → the ``segment-study`` Prefect flow over each part of the study → masks,
metrics and a review page per batch. ``data="isbi2012"`` runs the same on the real EM
data instead (when it has been fetched or a mirror is available).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from medseg.data import download, manifest, phantoms
from medseg.config import Config, config_from_dict
from medseg.errors import MedsegError

__all__ = ["DemoResult", "run_demo", "format_summary"]

CT_CLASSES = dict(phantoms.CT_CLASSES)
EM_CLASSES = dict(phantoms.EM_CLASSES)


@dataclass
class DemoResult:
    output: Path
    batches: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(b["ok"] for b in self.batches)


def _step(say: Callable[[str], None], text: str) -> None:
    say(f"[{time.strftime('%H:%M:%S')}] {text}")


def _write_study(root: Path, seed: int) -> dict[str, tuple[Path, Path]]:
    """Two batches: ct/ (DICOM series + NIfTI) and em/ (TIFF stack + PNG sequence), with references."""
    ct_images, ct_labels = root / "ct" / "images", root / "ct" / "labels"
    oblique = phantoms.ct_phantom(oblique=(12.0, -8.0, 20.0), seed=seed + 100)
    phantoms.write_dicom_series(oblique, ct_images / "patient1_ct", order="shuffled", extension="", seed=seed)
    phantoms.write_nifti(oblique.label, oblique.affine, ct_labels / "patient1_ct.nii.gz")
    plain = phantoms.ct_phantom(seed=seed + 101)
    phantoms.write_nifti(plain.image, plain.affine, ct_images / "patient2_ct.nii.gz")
    phantoms.write_nifti(plain.label, plain.affine, ct_labels / "patient2_ct.nii.gz")
    em_images, em_labels = root / "em" / "images", root / "em" / "labels"
    stack = phantoms.em_phantom(shape=(128, 96, 5), seed=seed + 102)
    phantoms.write_tiff_stack(stack.image, stack.affine, em_images / "em_stack.tif")
    phantoms.write_tiff_stack(stack.label, stack.affine, em_labels / "em_stack.tif")
    sequence = phantoms.em_phantom(shape=(96, 80, 4), seed=seed + 103)
    phantoms.write_png_sequence(sequence.image, em_images / "em_sequence")
    phantoms.write_png_sequence(sequence.label, em_labels / "em_sequence")
    return {"ct": (ct_images, ct_labels), "em": (em_images, em_labels)}


def _ct_config(data: Path, runs: Path, quick: bool) -> Config:
    images, labels = phantoms.write_ct_dataset(data, cases=4, seed=7)
    return config_from_dict(
        {
            "name": "demo_ct3d",
            "data": {
                "images": str(images),
                "labels": str(labels),
                "classes": CT_CLASSES,
                "split": {"mode": "cases", "train": ["case_000", "case_001", "case_002"], "val": ["case_003"]},
            },
            "preprocess": {"intensity": "ct_window", "orientation": "RAS", "spacing": [1.2, 1.2, 2.5]},
            "model": {
                "name": "unet",
                "spatial_dims": 3,
                "out_channels": 4,
                "features": 8,
                "depth": 2,
                "options": {"dropout": 0.0},
            },
            "augment": {"sigma": 2.0, "p_elastic": 0.3, "p_flip": 0.0, "rotate_degrees": 0, "shift": 0.0},
            "train": {
                "epochs": 4 if quick else 8,
                "steps_per_epoch": 15 if quick else 25,
                "batch_size": 2,
                "patch_size": [24, 24, 8],
                "learning_rate": 0.01,
            },
            "infer": {"sw_batch_size": 4},
            "output_dir": str(runs),
        }
    )


def _em_config(data: Path, runs: Path, quick: bool) -> Config:
    em = phantoms.em_phantom(shape=(96, 96, 8), cells=20, seed=11)
    phantoms.write_png_sequence(em.image, data / "images", prefix="slice")
    phantoms.write_png_sequence(em.label, data / "labels", prefix="slice")
    return config_from_dict(
        {
            "name": "demo_em2d",
            "data": {
                "images": str(data / "images"),
                "labels": str(data / "labels"),
                "classes": EM_CLASSES,
                "split": {"mode": "cases", "train": [f"slice{i}" for i in range(6)], "val": ["slice6", "slice7"]},
            },
            "model": {"name": "unet", "spatial_dims": 2, "features": 8, "depth": 3, "options": {"dropout": 0.0}},
            "augment": {"sigma": 5.0, "rotate_degrees": 30},
            "train": {
                "epochs": 3 if quick else 5,
                "steps_per_epoch": 15 if quick else 30,
                "batch_size": 4,
                "patch_size": [64, 64],
                "learning_rate": 0.01,
            },
            "output_dir": str(runs),
        }
    )


def _isbi_config(runs: Path, minutes: float) -> Config:
    from medseg.config import load_config, packaged_config

    overrides = [
        f"output_dir={runs}",
        "name=demo_isbi",
        f"train.time_budget_minutes={minutes}",
        "train.epochs=100",
        "train.steps_per_epoch=40",
    ]
    return load_config(packaged_config("unet_em.yaml"), overrides)


def _run_batch(name: str, images: Path, labels: Path | None, checkpoint: Path, out: Path) -> dict[str, Any]:
    """One segment-study flow run (masks, reports, review page)."""
    import medseg_flows  # noqa: F401  (Prefect privacy defaults before Prefect is imported)
    from medseg_flows.segment_study import segment_study

    state = segment_study(
        input_dir=images, output_dir=out, checkpoint=checkpoint, reference_dir=labels, return_state=True
    )
    page = out / "review.html"  # the flow's publish-reports step writes it
    predictions = json.loads((out / "predictions.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else None
    return {
        "name": name,
        "ok": state.is_completed(),
        "state": state.name,
        "message": state.message or "",
        "output": str(out),
        "review": str(page),
        "counts": predictions.get("counts", {}),
        "metrics": str(out / "metrics.csv") if metrics else None,
        "mean_dice": _mean_dice(metrics) if metrics else {},
    }


def _mean_dice(metrics: dict[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name, stats in (metrics.get("summary", {}).get("classes", {}) or {}).items():
        dice = stats.get("dice") if isinstance(stats, dict) else None
        out[name] = dice.get("mean") if isinstance(dice, dict) else None
    return out


# The folders the demo makes below --output, and the room it needs: a --quick phantom run writes 6.7 MB
# (measured); the ISBI run's latest.pt and best.pt (a 7.4 MB U-Net with its Adam state) ~45 MB, and a third
# while one is rewritten.
WORK_FOLDERS = (
    "study/ct",
    "study/em",
    "train/ct",
    "train/em",
    "runs/demo_ct3d",
    "runs/demo_em2d",
    "runs/demo_isbi",
    "results/ct",
    "results/em",
    "results/isbi_test",
)
DEMO_BYTES = 128 * 2**20


def _check_output(output: Path, data: str) -> None:
    """Before any work (the training takes minutes): --output lies outside the data the demo reads, no file
    stands where it makes a folder, and it takes a file and has room."""
    from medseg.pipeline.output import check_disjoint, check_room, probe_output

    if data == "isbi2012":
        for source in (manifest.default_data_root(), manifest.default_mirror()):
            if source is not None:
                check_disjoint(source, output)
    for name in WORK_FOLDERS:
        folder = output / name
        for path in (folder.parent, folder):
            if path.exists() and not path.is_dir():
                raise MedsegError(
                    f"{path} is an existing file, but the demo makes a folder there; move it or choose another --output"
                )
    probe_output(output)
    check_room(output, DEMO_BYTES, "the demo", "what its models, masks and reports take")


def run_demo(
    output: Path,
    seed: int = 0,
    quick: bool = False,
    data: str = "phantom",
    say: Callable[[str], None] = print,
) -> DemoResult:
    """Run the whole pipeline under ``output``; returns what was written where."""
    from medseg.training.loop import train

    start = time.monotonic()
    _check_output(output, data)
    result = DemoResult(output)
    runs = output / "runs"
    if data == "isbi2012":
        root = manifest.default_data_root()
        mirror = manifest.default_mirror()
        try:
            manifest.dataset_files("isbi2012_em", root)
        except MedsegError:
            if mirror is None:
                raise MedsegError(
                    "the ISBI 2012 data is not here; fetch it first: medseg data fetch isbi2012_em --mirror DIR"
                ) from None
            _step(say, f"fetching ISBI 2012 EM from {mirror}")
            download.fetch("isbi2012_em", dest=root, mirror=mirror)
        _step(say, "training a U-Net on ISBI 2012 EM (2 minutes)")
        run = train(_isbi_config(runs, 0.5 if quick else 2.0), overwrite=True).run_dir
        test = root / "isbi2012_em" / "test"
        _step(say, "segmenting the 30 ISBI test slices with the segment-study flow")
        result.batches.append(_run_batch("isbi2012 test", test, None, run, output / "results" / "isbi_test"))
    elif data == "phantom":
        _step(say, f"writing a phantom study to {output / 'study'}")
        study = _write_study(output / "study", seed)
        _step(say, "training a small 3D U-Net on CT phantoms")
        ct_run = train(_ct_config(output / "train" / "ct", runs, quick), overwrite=True).run_dir
        _step(say, "training a small 2D U-Net on EM phantoms")
        em_run = train(_em_config(output / "train" / "em", runs, quick), overwrite=True).run_dir
        for name, run in (("ct", ct_run), ("em", em_run)):
            images, labels = study[name]
            _step(say, f"running the segment-study flow over {images}")
            result.batches.append(_run_batch(name, images, labels, run, output / "results" / name))
    else:
        raise MedsegError(f"unknown demo data {data!r}; use phantom or isbi2012")
    result.seconds = round(time.monotonic() - start, 1)
    (output / "demo.json").write_text(json.dumps({"seconds": result.seconds, "batches": result.batches}, indent=2))
    return result


def format_summary(result: DemoResult) -> str:
    lines = ["", f"medseg demo finished in {result.seconds:.0f} s", ""]
    for batch in result.batches:
        counts = batch["counts"]
        lines.append(
            f"{batch['name']}: flow run {batch['state']}; {counts.get('written', 0)} masks written, "
            f"{counts.get('failed', 0)} failed"
        )
        lines.append(f"  masks:       {batch['output']}")
        if batch["metrics"]:
            dice = ", ".join(f"{k} {v:.3f}" for k, v in batch["mean_dice"].items() if v is not None)
            lines.append(f"  metrics:     {batch['metrics']}" + (f"  (mean Dice: {dice})" if dice else ""))
        lines.append(f"  review page: {batch['review']}   (or: medseg view {batch['output']})")
        if not batch["ok"]:
            lines.append(f"  problem:     {batch['message']}")
    return "\n".join(lines)
