"""Class 1 of issue #15, containment: nothing from a file's name or metadata leaves the output root, and
input and output trees are disjoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import em_nifti_scans, one_file_manifest, series_with_numbers, write_em_pairs
from hostile_corpus.checker import Case, Run, World
from hostile_corpus.common import predict, sha256_of, went_on


# ============================================================================ 1. containment


def dicom_numbers(numbers: list[str], watch: tuple[str, ...] = ()):
    def build(w: World) -> Run:
        series_with_numbers(w.inputs / "study", numbers)
        masks = len(numbers)

        def distinct() -> None:
            assert len(list(w.out.rglob("*.nii.gz"))) == masks  # no case overwrote another

        return Run(
            predict(w, "--format", "nifti"),
            w.out,
            0,
            says=(f"{masks} written",),
            after=distinct,
            watch=tuple(Path(p) for p in watch),
        )

    return build


def odd_file_names(w: World) -> Run:
    names = ["x\x1fy", os.fsdecode(b"scan_\xff\xfe"), "\u00e9" * 120, "-rf"]
    em_nifti_scans(w.inputs, names)

    def inside() -> None:
        masks = [p for p in w.out.rglob("*.nii.gz")]
        assert len(masks) == len(names) and all(len(p.name.encode()) <= 255 for p in masks)

    return Run(predict(w), w.out, 0, says=(f"{len(names)} written",), after=inside)


def case_collisions(w: World) -> Run:
    def png(path: Path, value: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((40, 40), value, np.uint8)).save(path)

    png(w.inputs / "a" / "s1.png", 1)
    png(w.inputs / "a" / "s2.png", 2)
    png(w.inputs / "a" / "s" / "s1.png", 3)
    for name in ("1.png", "1.PNG", "2.png"):
        png(w.inputs / "x" / name, 4)
    png(w.inputs / "C.png", 5)
    png(w.inputs / "c.png", 6)

    def distinct() -> None:
        outputs = [
            o.casefold() for r in json.loads((w.out / "predictions.json").read_text())["records"] for o in r["outputs"]
        ]
        assert len(outputs) == len(set(outputs)) == 8

    return Run(predict(w, "--format", "png"), w.out, 0, says=("5 written",), after=distinct)


def overlap(layout: str):
    def build(w: World) -> Run:
        data = w.root / "data"
        inputs = data / "in"
        em_nifti_scans(inputs, ["a"])
        out = {"equal": inputs, "inside": inputs / "masks", "holding": data}.get(layout, w.root / "link")
        if layout == "link-to-input":
            out.symlink_to(inputs)
        if layout == "link-to-parent":
            out.symlink_to(data)
        return Run(predict(w, inputs=inputs, out=out), None, 1, says=("overlap", str(inputs)))

    return build


def input_links_into_output(w: World) -> Run:
    em_nifti_scans(w.out / "data", ["scan"])  # a mask already in the output folder
    em_nifti_scans(w.inputs, ["plain"])
    (w.inputs / "data").mkdir()
    (w.inputs / "data" / "scan.nii.gz").symlink_to(w.out / "data" / "scan.nii.gz")
    return Run(
        predict(w),
        w.out,
        1,
        says=("FAILED data/scan", "is a link into the output folder"),
        after=went_on(w, "plain.nii.gz"),
    )


def own_folder_linked(name: str):
    def build(w: World) -> Run:
        em_nifti_scans(w.inputs, ["a"])
        elsewhere = w.root / "elsewhere"
        elsewhere.mkdir()
        (elsewhere / "probe").write_text("precious")
        link = w.out / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(elsewhere)
        return Run(predict(w), w.out, 1, says=("outside the output folder",))

    return build


def evaluate_into_reference(w: World) -> Run:
    em_nifti_scans(w.inputs / "pred", ["a"])
    em_nifti_scans(w.inputs / "ref", ["a"])
    ref = w.inputs / "ref"
    return Run(
        ["evaluate", "--pred", str(w.inputs / "pred"), "--ref", str(ref), "--output", str(ref / "reports")],
        None,
        1,
        says=("overlap", str(ref)),
    )


def evaluate_pred_is_ref(w: World) -> Run:
    em_nifti_scans(w.inputs, ["a"])
    return Run(["evaluate", "--pred", str(w.inputs), "--ref", str(w.inputs)], None, 1, says=("are the same folder",))


def train_into_data(w: World) -> Run:

    write_em_pairs(w.inputs, slices=5)
    config = w.root / "c.yaml"
    config.write_text(
        f"name: inside\ndata: {{images: {w.inputs / 'images'}, labels: {w.inputs / 'labels'}, "
        "classes: {membrane: 0, cell: 255}}\nmodel: {name: unet, features: 8, depth: 2}\n"
        f"output_dir: {w.inputs / 'images'}\n"
    )
    return Run(["train", "--config", str(config)], None, 1, says=("overlap", "data.images"))


def demo_inside(where: str):
    def build(w: World) -> Run:
        data, mirror = w.root / "data", w.root / "mirror"
        for folder in (data, mirror):
            folder.mkdir()
            (folder / "README").write_text("a user's data")
        out = (data if where == "data" else mirror) / "demo"
        env = {"MEDSEG_DATA_DIR": str(data), "MEDSEG_DATA_MIRROR": str(mirror)}
        return Run(["demo", "--data", "isbi2012", "--output", str(out)], None, 1, says=("overlap", str(out)), env=env)

    return build


def manifest_entry(entry: str, problem: str, shown: str | None = None):
    def build(w: World) -> Run:
        (w.root / "mirror" / "tiny" / "img").mkdir(parents=True)
        path = one_file_manifest(w.root / "m.csv", "", entry=entry)
        return Run(
            [
                "data",
                "fetch",
                "tiny",
                "--mirror",
                str(w.root / "mirror"),
                "--dest",
                str(w.out),
                "--manifest",
                str(path),
            ],
            w.out,
            1,
            says=("m.csv", shown or entry, problem),
        )

    return build


def dest_link_out(w: World) -> Run:
    mirror = w.root / "mirror"
    (mirror / "tiny" / "img").mkdir(parents=True)
    (mirror / "tiny" / "img" / "a.bin").write_bytes(b"data")
    (w.root / "elsewhere").mkdir()
    (w.out / "tiny").mkdir(parents=True)
    (w.out / "tiny" / "img").symlink_to(w.root / "elsewhere")
    path = one_file_manifest(w.root / "m.csv", "", sha256=sha256_of(b"data"), size=4)
    argv = ["data", "fetch", "tiny", "--mirror", str(mirror), "--dest", str(w.out), "--manifest", str(path)]
    return Run(argv, w.out, 1, says=("a.bin", "resolves outside"))


CONTAINMENT = [
    Case("series-number-dotdot", 1, "predict", dicom_numbers(["1/../../..", "2"])),
    Case("series-number-escape", 1, "predict", dicom_numbers(["../../../../tmp/evil", "..\\..\\x"], ("/tmp/evil",))),
    Case("series-number-dots", 1, "predict", dicom_numbers([".", ".."])),
    Case("series-numbers-equal-once-sanitised", 1, "predict", dicom_numbers(["1/x", "1_x"])),
    Case("control-non-utf8-long-names", 1, "predict", odd_file_names),
    Case("case-collisions", 1, "predict", case_collisions),
    Case("output-is-input", 1, "predict", overlap("equal")),
    Case("output-inside-input", 1, "predict", overlap("inside")),
    Case("output-holds-input", 1, "predict", overlap("holding")),
    Case("output-links-to-input", 1, "predict", overlap("link-to-input")),
    Case("output-links-to-input-parent", 1, "predict", overlap("link-to-parent")),
    Case("input-links-into-output", 1, "predict", input_links_into_output),
    Case("journal-folder-linked-out", 1, "predict", own_folder_linked(".medseg/journal")),
    Case("medseg-folder-linked-out", 1, "predict", own_folder_linked(".medseg")),
    Case("output-inside-reference", 1, "evaluate", evaluate_into_reference),
    Case("pred-is-ref", 1, "evaluate", evaluate_pred_is_ref),
    Case("run-folder-inside-data", 1, "train", train_into_data),
    Case("output-inside-data-root", 1, "demo", demo_inside("data")),
    Case("output-inside-mirror", 1, "demo", demo_inside("mirror")),
    Case("manifest-path-dotdot", 1, "data", manifest_entry("../escape.bin", "leaves the dataset folder")),
    Case("manifest-path-absolute", 1, "data", manifest_entry("/etc/passwd", "is absolute")),
    Case("manifest-path-backslash", 1, "data", manifest_entry("img\\..\\..\\x", "backslash", shown="img")),
    Case("manifest-path-drive", 1, "data", manifest_entry("C:/x.bin", "drive letter")),
    Case("dest-links-out", 1, "data", dest_link_out),
]
