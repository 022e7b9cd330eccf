"""Classes 2, 3 and 11 of issue #15: only medseg's own litter goes, the output is checked first, the umask
is honoured."""

from __future__ import annotations

import errno
import json
import os

import nibabel as nib

from conftest import em_nifti_scans, one_file_manifest, write_em_pairs
from hostile_corpus.checker import Case, Run, World
from hostile_corpus.common import (
    COMMANDS,
    dead_pid,
    finished_batch,
    journal,
    plant_user_files,
    predict,
    sha256_of,
    slug,
    tiny_train_yaml,
    went_on,
)
from medseg.files import TMP_MARKER


# ============================================================================ 2. only our own litter


def predict_keeps_user_files(w: World) -> Run:
    em_nifti_scans(w.inputs, ["a"])
    plant_user_files(w.out)
    return Run(predict(w), w.out, 0, says=("1 written",), after=went_on(w, "a.nii.gz"))


def predict_clears_only_the_dead_runs_file(w: World) -> Run:
    em_nifti_scans(w.inputs, ["a"])
    plant_user_files(w.out)
    ours = w.out / f".a.deadbeef{TMP_MARKER}.nii.gz"
    ours.write_bytes(b"half a mask")
    live = w.out / f".b.cafe{TMP_MARKER}.nii.gz"
    live.write_bytes(b"being written by a live process")
    entries = [journal(w.out, "deadbeef", ours.name, dead_pid())]
    journal(w.out, "cafe", live.name, os.getpid())

    def only_ours_went() -> None:
        assert not ours.exists() and live.exists()

    return Run(predict(w), w.out, 0, says=("1 written",), may_change=(ours, *entries), after=only_ours_went)


def journal_names(tmp: str):
    def build(w: World) -> Run:
        em_nifti_scans(w.inputs, ["a"])
        plant_user_files(w.out)
        victim = w.out.parent / "victim.txt"
        victim.write_text("outside")
        entry = journal(w.out, "escape", tmp, dead_pid())
        return Run(predict(w), w.out, 0, says=("1 written",), may_change=(entry,))

    return build


def evaluate_keeps_user_files(w: World) -> Run:
    em_nifti_scans(w.inputs / "pred", ["a"])
    em_nifti_scans(w.inputs / "ref", ["a"])
    plant_user_files(w.out)
    argv = ["evaluate", "--pred", str(w.inputs / "pred"), "--ref", str(w.inputs / "ref"), "--output", str(w.out)]
    return Run(argv, w.out, 0, says=("metrics.csv",))


def view_keeps_user_files(w: World) -> Run:
    em_nifti_scans(w.inputs, ["a"])
    finished_batch(w)
    (w.out / "review").mkdir(exist_ok=True)
    for name in ("case-notes.js", "case-9999.js"):
        (w.out / "review" / name).write_text("// a user's file")
    plant_user_files(w.out)
    page = w.out / "review.html"
    own = (*sorted((w.out / "review").glob("case-0*.js")), page, w.out / ".medseg" / "review-files.json")
    return Run(["view", str(w.out), "--rebuild"], w.out, 0, says=("Wrote", "review.html"), may_change=own)


def data_keeps_user_files(w: World) -> Run:
    mirror = w.root / "mirror"
    (mirror / "tiny" / "img").mkdir(parents=True)
    (mirror / "tiny" / "img" / "a.bin").write_bytes(b"data")
    plant_user_files(w.out / "tiny" / "img")
    path = one_file_manifest(w.root / "m.csv", "", sha256=sha256_of(b"data"), size=4)
    argv = ["data", "fetch", "tiny", "--mirror", str(mirror), "--dest", str(w.out), "--manifest", str(path)]
    return Run(argv, w.out, 0, says=("tiny: 1 files verified",))


def train_keeps_user_files(w: World) -> Run:

    write_em_pairs(w.inputs, slices=5)
    config = w.root / "c.yaml"
    config.write_text(tiny_train_yaml(w, "run"))
    plant_user_files(w.out / "run")
    return Run(["train", "--config", str(config)], w.out, 0, says=("Trained unet for 1 epoch(s)",))


LITTER = [
    Case("user-files-survive", 2, "predict", predict_keeps_user_files),
    Case("only-the-dead-runs-journalled-file-goes", 2, "predict", predict_clears_only_the_dead_runs_file),
    Case("journal-entry-names-a-file-outside", 2, "predict", journal_names("../victim.txt")),
    Case("journal-entry-names-a-users-file", 2, "predict", journal_names(".thesis.partial.docx")),
    Case("journal-entry-forged-with-our-marker", 2, "predict", journal_names(f"notes{TMP_MARKER}.txt")),
    Case("user-files-survive", 2, "evaluate", evaluate_keeps_user_files),
    Case("user-files-in-review-survive", 2, "view", view_keeps_user_files),
    Case("user-files-in-dest-survive", 2, "data", data_keeps_user_files),
    Case("user-files-in-run-folder-survive", 2, "train", train_keeps_user_files),
]


# ============================================================================ 3. the output is checked first


def output_is_a_file(command: str):
    def build(w: World) -> Run:
        em_nifti_scans(w.inputs, ["a"])
        target = w.out.parent / "out.txt"
        target.write_text("not a folder")
        if command == "predict":
            argv = predict(w, out=target)
        elif command == "evaluate":
            argv = ["evaluate", "--pred", str(w.inputs), "--ref", str(w.inputs / "x"), "--output", str(target)]
            em_nifti_scans(w.inputs / "x", ["a"])
        elif command == "demo":
            argv = ["demo", "--output", str(target)]
        elif command == "phantom":
            argv = ["data", "phantom", str(target), "--cases", "1"]
        elif command == "fetch":
            (w.root / "mirror" / "tiny" / "img").mkdir(parents=True)
            (w.root / "mirror" / "tiny" / "img" / "a.bin").write_bytes(b"data")
            m = one_file_manifest(w.root / "m.csv", "", sha256=sha256_of(b"data"), size=4)
            argv = ["data", "fetch", "tiny", "--mirror", str(w.root / "mirror"), "--dest", str(target)]
            argv += ["--manifest", str(m)]
        elif command == "train":
            write_em_pairs(w.inputs, slices=5)
            (w.root / "c.yaml").write_text(tiny_train_yaml(w, "run", out=target))
            argv = ["train", "--config", str(w.root / "c.yaml")]
        else:
            argv = ["view", str(target)]
        return Run(argv, None, 1, says=("out.txt",))

    return build


def demo_work_folder_is_a_file(name: str):
    def build(w: World) -> Run:
        (w.out / name).parent.mkdir(parents=True, exist_ok=True)
        (w.out / name).write_text("a user's file where the demo writes a folder")
        return Run(["demo", "--quick", "--output", str(w.out)], w.out, 1, says=(str(w.out / name), "existing file"))

    return build


def read_only_output(command: str):
    def build(w: World) -> Run:
        em_nifti_scans(w.inputs, ["a"])
        out = w.mount(w.out.parent / "ro", read_only=True) / "out"
        if command == "predict":
            argv = predict(w, out=out)
        elif command == "evaluate":
            em_nifti_scans(w.inputs / "ref", ["a"])
            argv = ["evaluate", "--pred", str(w.inputs), "--ref", str(w.inputs / "ref"), "--output", str(out)]
        elif command == "demo":
            argv = ["demo", "--quick", "--output", str(out)]
        elif command == "train":
            write_em_pairs(w.inputs / "em", slices=5)
            config = w.root / "c.yaml"
            config.write_text(tiny_train_yaml(w, "run", out=out).replace(str(w.inputs), str(w.inputs / "em")))
            argv = ["train", "--config", str(config)]
        else:
            (w.root / "mirror" / "tiny" / "img").mkdir(parents=True)
            (w.root / "mirror" / "tiny" / "img" / "a.bin").write_bytes(b"data")
            m = one_file_manifest(w.root / "m.csv", "", sha256=sha256_of(b"data"), size=4)
            argv = [
                "data",
                "fetch",
                "tiny",
                "--mirror",
                str(w.root / "mirror"),
                "--dest",
                str(out),
                "--manifest",
                str(m),
            ]
        return Run(argv, None, 1, says=(str(out), "Read-only file system"))

    return build


def no_room(command: str):
    def build(w: World) -> Run:
        em_nifti_scans(w.inputs, ["a", "b"])
        out = w.mount(w.out.parent / "small", size="1m") / "out"
        argv = predict(w, out=out) if command == "predict" else ["demo", "--quick", "--output", str(out)]
        return Run(argv, out, 1, says=(str(out), "MB free", "may need up to"))

    return build


def full_mid_batch(code: int):
    def build(w: World) -> Run:
        em_nifti_scans(w.inputs, ["a", "b", "c"])
        calls: list[object] = []
        real = nib.save

        def save(img, filename):
            calls.append(filename)
            if len(calls) == 2:  # the second mask: the disk is full (or read-only, over quota) now
                raise OSError(code, os.strerror(code), str(filename))
            return real(img, filename)

        def one_written() -> None:
            assert sorted(p.name for p in w.out.glob("*.nii.gz")) == ["a.nii.gz"]
            assert json.loads((w.out / "predictions.json").read_text())["stopped"]

        return Run(
            predict(w),
            w.out,
            1,
            says=("stopped early", os.strerror(code), "rerun the same command to resume"),
            patches=[(nib, "save", save)],
            after=one_written,
        )

    return build


def remounted_read_only_mid_batch(w: World) -> Run:
    """A real EROFS: the output's file system is remounted read-only after the first scan's model work."""
    from medseg.inference.predictor import Predictor

    em_nifti_scans(w.inputs, ["a", "b", "c"])
    mount = w.mount(w.out.parent / "disk", size="32m")
    out = mount / "out"
    real = Predictor.predict
    done: list[str] = []

    def predict_then_remount(self, scan, probabilities=False):
        result = real(self, scan, probabilities)
        done.append(scan.ref.id)
        if len(done) == 2:
            w.remount(mount, read_only=True)
        return result

    return Run(
        predict(w, out=out),
        out,
        1,
        says=("stopped early", "Read-only file system"),
        patches=[(Predictor, "predict", predict_then_remount)],
    )


def train_disk_fills(w: World) -> Run:

    write_em_pairs(w.inputs, slices=5)
    out = w.mount(w.out.parent / "small", size="96k") / "runs"
    (w.root / "c.yaml").write_text(tiny_train_yaml(w, "run", out=out))
    return Run(["train", "--config", str(w.root / "c.yaml")], out, 1, says=("No space left on device",))


def output_behind_link_loop(w: World) -> Run:
    em_nifti_scans(w.inputs, ["a"])
    (w.out.parent / "loop").symlink_to(w.out.parent / "loop")
    return Run(predict(w, out=w.out.parent / "loop" / "out"), None, 1, says=("cannot be resolved",))


OUTPUT_FIRST = [
    *(
        Case(f"output-is-a-file-{c}", 3, c if c in COMMANDS else "data", output_is_a_file(c))
        for c in ("predict", "evaluate", "train", "view", "demo", "phantom", "fetch")
    ),
    *(
        Case(f"work-folder-is-a-file-{slug(n)}", 3, "demo", demo_work_folder_is_a_file(n))
        for n in ("study", "runs", "results/ct", "train/em")
    ),
    *(
        Case(f"read-only-output-{c}", 3, c if c != "fetch" else "data", read_only_output(c))
        for c in ("predict", "evaluate", "train", "demo", "fetch")
    ),
    Case("no-room", 3, "predict", no_room("predict")),
    Case("no-room", 3, "demo", no_room("demo")),
    *(
        Case(f"mid-batch-{errno.errorcode[c]}", 3, "predict", full_mid_batch(c))
        for c in (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES)
    ),
    Case("remounted-read-only-mid-batch", 3, "predict", remounted_read_only_mid_batch),
    Case("disk-fills-mid-run", 3, "train", train_disk_fills),
    Case("output-behind-a-link-loop", 3, "predict", output_behind_link_loop),
]


# ============================================================================ 11. umask


def umask_predict(umask: int):
    def build(w: World) -> Run:
        em_nifti_scans(w.inputs, ["a", "b"])
        return Run(predict(w), w.out, 0, says=("2 written",), umask=umask)

    return build


def umask_evaluate(w: World) -> Run:
    run = evaluate_keeps_user_files(w)
    run.umask = 0o002
    return run


def umask_view(w: World) -> Run:
    run = view_keeps_user_files(w)
    run.umask = 0o077
    return run


def umask_fetch(w: World) -> Run:
    run = data_keeps_user_files(w)
    run.umask = 0o002
    return run


def umask_train(w: World) -> Run:
    run = train_keeps_user_files(w)
    run.umask = 0o002
    return run


UMASK = [
    Case("umask-002", 11, "predict", umask_predict(0o002)),
    Case("umask-077", 11, "predict", umask_predict(0o077)),
    Case("umask-002", 11, "evaluate", umask_evaluate),
    Case("umask-077", 11, "view", umask_view),
    Case("umask-002", 11, "data", umask_fetch),
    Case("umask-002", 11, "train", umask_train),
]
