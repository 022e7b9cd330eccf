"""The hostile-input corpus: every case maps to the medseg error (or handling) it must get.

Each row builds one broken input in a fresh folder, runs the medseg call a user would
run on it, and checks the error type, a message fragment, and that the message names the
offending file. The batch test then mixes every scan-level case with good scans and checks
that the good ones are still written.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pydicom
import pytest
import tifffile
import torch
from PIL import Image

from medseg.data import download, manifest, phantoms
from medseg.training.checkpoint import CheckpointError, load_checkpoint
from medseg.config import load_config
from medseg.errors import ConfigError, LabelError, ManifestError, MedsegError, ScanError
from medseg.ingest import discover, load, load_label, ref_for_path

# --- builders: each writes one hostile input under `root` and returns the path to use ----


def _series(root: Path, shape=(16, 14, 6), **kw) -> list[Path]:
    return phantoms.write_dicom_series(phantoms.ct_phantom(shape=shape, seed=4), root / "ct", **kw)


def _edit(path: Path, **attrs) -> None:
    ds = pydicom.dcmread(path)
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.save_as(path)


def truncated_dicom(root):
    paths = _series(root)
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[: len(data) - 300])
    return root / "ct"


def dicom_header_cut(root):
    paths = _series(root)
    paths[0].write_bytes(paths[0].read_bytes()[:200])
    return root / "ct"


def dicom_no_pixels(root):
    paths = _series(root)
    ds = pydicom.dcmread(paths[1])
    del ds.PixelData
    ds.save_as(paths[1])
    return root / "ct"


def wrong_transfer_syntax(root):
    paths = _series(root)
    raw = paths[0].read_bytes()
    native, rle = b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.2.5\x00"  # same length: header stays valid
    head = raw[:400].replace(native, rle)
    assert head != raw[:400]
    paths[0].write_bytes(head + raw[400:])  # declares RLE, holds raw pixel bytes
    return paths[0]


def missing_slice(root):
    _series(root)[3].unlink()
    return root / "ct"


def duplicate_position(root):
    paths = _series(root)
    shutil.copy(paths[2], root / "ct" / "dup.dcm")
    _edit(root / "ct" / "dup.dcm", SOPInstanceUID=pydicom.uid.generate_uid())
    return root / "ct"


def gantry_tilt(root):
    paths = _series(root)
    for k, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        ipp = [float(v) for v in ds.ImagePositionPatient]
        ipp[1] += k * 2.5 * np.tan(np.radians(12))
        _edit(p, ImagePositionPatient=[f"{v:.6f}" for v in ipp])
    return root / "ct"


def mixed_orientation(root):
    paths = _series(root)
    _edit(paths[1], ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    return root / "ct"


def mixed_matrix_size(root):
    paths = _series(root)
    other = phantoms.write_dicom_series(phantoms.ct_phantom(shape=(10, 10, 6)), root / "other")
    ds = pydicom.dcmread(other[0])
    ds.SeriesInstanceUID = pydicom.dcmread(paths[0]).SeriesInstanceUID
    ds.save_as(root / "ct" / "odd.dcm")
    return root / "ct"


def degenerate_orientation(root):
    for p in _series(root):
        _edit(p, ImageOrientationPatient=[0, 0, 0, 0, 0, 0])
    return root / "ct"


def malformed_rescale(root):
    for p in _series(root):
        ds = pydicom.dcmread(p)
        tag = pydicom.datadict.tag_for_keyword("RescaleSlope")
        ds[tag] = pydicom.DataElement(tag, "LO", "abc")
        ds.save_as(p)
    return root / "ct"


def png_named_dcm(root):
    root.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "x.png")
    (root / "x.png").rename(root / "scan.dcm")
    return root / "scan.dcm"


def zero_byte_file(root):
    root.mkdir(parents=True, exist_ok=True)
    (root / "empty.dcm").write_bytes(b"")
    return root / "empty.dcm"


def _nifti(root: Path, data: np.ndarray, name: str = "v.nii.gz", affine=None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), root / name)
    return root / name


def nifti_nan(root):
    data = np.zeros((6, 6, 6), np.float32)
    data[1, 2, 3] = np.nan
    return _nifti(root, data)


def nifti_inf(root):
    data = np.zeros((6, 6, 6), np.float32)
    data[0, 0, 0] = -np.inf
    return _nifti(root, data)


def nifti_singular(root):
    root.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), None)
    img.header.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code=1)
    img.header.set_qform(None, code=0)
    nib.save(img, root / "flat.nii")
    return root / "flat.nii"


def nifti_giant_header(root):
    path = _nifti(root, np.zeros((4, 4, 4), np.float32), "giant.nii")
    raw = bytearray(path.read_bytes())
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw)))
    hdr.set_data_shape((30000, 30000, 30000))
    raw[:348] = hdr.binaryblock
    path.write_bytes(bytes(raw))
    return path


def nifti_truncated_gzip(root):
    path = _nifti(root, np.random.default_rng(0).random((24, 24, 24)).astype(np.float32))
    path.write_bytes(path.read_bytes()[:3000])
    return path


def nifti_text_content(root):
    root.mkdir(parents=True, exist_ok=True)
    (root / "notes.nii.gz").write_bytes(gzip.compress(b"this is not an image"))
    return root / "notes.nii.gz"


def nifti_too_many_dims(root):
    return _nifti(root, np.zeros((2, 2, 2, 1, 2, 2), np.uint8), "six.nii.gz")


def corrupt_png(root):
    root.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(0).integers(0, 255, (40, 40), dtype=np.uint8)
    Image.fromarray(noise).save(root / "p.png")
    data = (root / "p.png").read_bytes()
    (root / "p.png").write_bytes(data[: len(data) // 2])
    return root / "p.png"


def truncated_tiff(root):
    root.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(1).integers(0, 255, (4, 64, 64), dtype=np.uint8)
    tifffile.imwrite(root / "s.tif", data, imagej=True, compression="zlib")
    raw = (root / "s.tif").read_bytes()
    (root / "s.tif").write_bytes(raw[: len(raw) // 3])
    return root / "s.tif"


def sequence_mixed_sizes(root):
    seq = root / "seq"
    seq.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(seq / "0.png")
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(seq / "1.png")
    return seq


def decompression_bomb(root):
    root.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "b.png")
    raw = bytearray((root / "b.png").read_bytes())
    raw[16:24] = (60000).to_bytes(4, "big") + (60000).to_bytes(4, "big")  # IHDR: 60000 x 60000 declared
    import zlib

    raw[29:33] = zlib.crc32(bytes(raw[12:29])).to_bytes(4, "big")
    (root / "b.png").write_bytes(bytes(raw))
    return root / "b.png"


def empty_folder(root):
    (root / "nothing").mkdir(parents=True)
    return root / "nothing"


def _label_case(root, label: np.ndarray, affine=None, name="lab.nii.gz"):
    ct = phantoms.ct_phantom(shape=(12, 10, 6))
    phantoms.write_nifti(ct.image, ct.affine, root / "img.nii.gz")
    phantoms.write_nifti(label, ct.affine if affine is None else affine, root / name)
    return root / name


def label_other_grid(root):
    affine = phantoms.ct_phantom(shape=(12, 10, 6)).affine.copy()
    affine[:3, 3] += 3.0
    return _label_case(root, np.zeros((12, 10, 6), np.uint8), affine)


def label_other_shape(root):
    return _label_case(root, np.zeros((12, 10, 5), np.uint8))


def label_unknown_values(root):
    label = np.zeros((12, 10, 6), np.uint8)
    label[2, 2, 2] = 9
    return _label_case(root, label)


def label_fractional(root):
    label = np.zeros((12, 10, 6), np.float32)
    label[1, 1, 1] = 0.4
    return _label_case(root, label)


def label_rgb(root):
    root.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((6, 5), np.uint8)).save(root / "img.png")
    Image.fromarray(np.zeros((6, 5, 3), np.uint8)).save(root / "lab.png")
    return root / "lab.png"


def config_wrong_type(root):
    root.mkdir(parents=True, exist_ok=True)
    (root / "c.yaml").write_text("model: {name: unet}\ntrain: {epochs: ten}\n")
    return root / "c.yaml"


def config_unknown_key(root):
    root.mkdir(parents=True, exist_ok=True)
    (root / "c.yaml").write_text("model: {name: unet}\ntrian: {epochs: 3}\n")
    return root / "c.yaml"


def config_not_yaml(root):
    root.mkdir(parents=True, exist_ok=True)
    (root / "c.yaml").write_text("model: [unclosed\n")
    return root / "c.yaml"


def _manifest(root: Path, path: str, sha: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    header = "dataset,case,role,path,sha256,split,source_url,licence\n"
    (root / "m.csv").write_text(header + f"d,c0,image,{path},{sha},train,file:///nowhere,test\n")
    return root / "m.csv"


def manifest_escaping_path(root):
    return _manifest(root, "../../etc/passwd", "0" * 64)


def manifest_absolute_path(root):
    return _manifest(root, "/etc/passwd", "0" * 64)


def manifest_wrong_checksum(root):
    (root / "mirror" / "d").mkdir(parents=True)
    (root / "mirror" / "d" / "a.png").write_bytes(b"real bytes")
    return _manifest(root, "a.png", "1" * 64)


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/medseg-pwned",))


def checkpoint_pickle_exploit(root):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "evil.pt", "wb") as fh:
        pickle.dump({"format": "medseg-checkpoint/1", "model": Exploit()}, fh)
    return root / "evil.pt"


def checkpoint_truncated(root):
    root.mkdir(parents=True, exist_ok=True)
    path = root / "t.pt"
    torch.save({"format": "medseg-checkpoint/2", "model": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:500])
    return path


def checkpoint_foreign(root):
    root.mkdir(parents=True, exist_ok=True)
    torch.save({"conv.weight": torch.zeros(3)}, root / "foreign.pt")
    return root / "foreign.pt"


# --- actions a user would run on them ---------------------------------------------------


def act_load(path: Path):
    """discover + load, the way `medseg info` / `predict` read input."""
    found = discover(path)
    if found.problems:
        first = found.problems[0]
        raise ScanError(first.paths, first.reason)
    if not found.scans:
        raise ScanError(path, "holds no scan medseg can read")
    for ref in found.scans:
        load(ref)


def act_label(path: Path):
    image = path.parent / ("img.png" if path.suffix == ".png" else "img.nii.gz")
    scan = load(ref_for_path(image))
    load_label(path, scan, classes=[0, 1, 2, 3])


def act_config(path: Path):
    load_config(path)


def act_manifest(path: Path):
    entries = manifest.read_manifest(path)
    download.fetch("d", dest=path.parent / "dest", mirror=path.parent / "mirror", manifest=path)
    return entries


def act_checkpoint(path: Path):
    load_checkpoint(path)


@dataclass(frozen=True)
class Hostile:
    name: str
    build: Callable[[Path], Path]
    action: Callable[[Path], object]
    error: type[MedsegError]
    message: str
    names_file: str | None = None  # a file name the message must contain (default: the built path's)


CORPUS = [
    Hostile("truncated DICOM pixel data", truncated_dicom, act_load, ScanError, "truncated", "IM0003.dcm"),
    Hostile("DICOM header cut short", dicom_header_cut, act_load, ScanError, "IM0001.dcm", "IM0001.dcm"),
    Hostile("DICOM without pixel data", dicom_no_pixels, act_load, ScanError, "no pixel data", "IM0002.dcm"),
    Hostile("wrong transfer syntax declared", wrong_transfer_syntax, act_load, ScanError, "cannot decode pixel data"),
    Hostile("missing slice", missing_slice, act_load, ScanError, "non-uniform slice spacing", "IM0001.dcm"),
    Hostile("duplicate slice positions", duplicate_position, act_load, ScanError, "duplicate positions", "dup.dcm"),
    Hostile("gantry tilt", gantry_tilt, act_load, ScanError, "gantry-tilted by 12.00 degrees", "IM0001.dcm"),
    Hostile("mixed orientations", mixed_orientation, act_load, ScanError, "mixes image orientations", "IM0002.dcm"),
    Hostile("mixed matrix sizes", mixed_matrix_size, act_load, ScanError, "mixes image sizes", "odd.dcm"),
    Hostile(
        "degenerate orientation",
        degenerate_orientation,
        act_load,
        ScanError,
        "not two orthogonal unit vectors",
        "IM0001.dcm",
    ),
    Hostile("malformed RescaleSlope", malformed_rescale, act_load, ScanError, "RescaleSlope", "IM000"),
    Hostile("PNG named .dcm", png_named_dcm, act_load, ScanError, "holds PNG content, not DICOM"),
    Hostile("zero-byte file", zero_byte_file, act_load, ScanError, "empty file"),
    Hostile("NIfTI with NaN", nifti_nan, act_load, ScanError, "NaN or Inf"),
    Hostile("NIfTI with Inf", nifti_inf, act_load, ScanError, "NaN or Inf"),
    Hostile("NIfTI singular affine", nifti_singular, act_load, ScanError, "singular"),
    Hostile("gigantic declared dimensions", nifti_giant_header, act_load, ScanError, "header declares shape"),
    Hostile("truncated .nii.gz", nifti_truncated_gzip, act_load, ScanError, "truncated or corrupt"),
    Hostile("text inside .nii.gz", nifti_text_content, act_load, ScanError, "not a readable NIfTI"),
    Hostile("6-dimensional NIfTI", nifti_too_many_dims, act_load, ScanError, "not supported"),
    Hostile("corrupt PNG", corrupt_png, act_load, ScanError, "not a readable image"),
    Hostile("truncated TIFF stack", truncated_tiff, act_load, ScanError, "s.tif"),
    Hostile("image sequence of mixed sizes", sequence_mixed_sizes, act_load, ScanError, "mixes sizes", "1.png"),
    Hostile("decompression bomb PNG", decompression_bomb, act_load, ScanError, "safety limit"),
    Hostile("empty folder", empty_folder, act_load, ScanError, "holds no scan"),
    Hostile("label on another grid", label_other_grid, act_label, LabelError, "label grid does not match"),
    Hostile("label of another shape", label_other_shape, act_label, LabelError, "shape"),
    Hostile(
        "label values outside the classes",
        label_unknown_values,
        act_label,
        LabelError,
        "not among the configured classes",
    ),
    Hostile("float label with fractions", label_fractional, act_label, LabelError, "non-integer"),
    Hostile("RGB label", label_rgb, act_label, LabelError, "3 channels"),
    Hostile("config with a wrong type", config_wrong_type, act_config, ConfigError, "train.epochs"),
    Hostile("config with an unknown key", config_unknown_key, act_config, ConfigError, "trian: unknown key"),
    Hostile("config that is not YAML", config_not_yaml, act_config, ConfigError, "not valid YAML"),
    Hostile("manifest path escaping the root", manifest_escaping_path, act_manifest, ManifestError, "../../etc/passwd"),
    Hostile("manifest absolute path", manifest_absolute_path, act_manifest, ManifestError, "/etc/passwd"),
    Hostile("manifest wrong checksum", manifest_wrong_checksum, act_manifest, ManifestError, "checksum", "a.png"),
    Hostile(
        "checkpoint with a code-running pickle",
        checkpoint_pickle_exploit,
        act_checkpoint,
        CheckpointError,
        "refused to load",
    ),
    Hostile("truncated checkpoint", checkpoint_truncated, act_checkpoint, CheckpointError, "not a readable checkpoint"),
    Hostile("foreign checkpoint", checkpoint_foreign, act_checkpoint, CheckpointError, "not a medseg checkpoint"),
]


@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
def test_hostile_case_gets_its_clear_error(case: Hostile, tmp_path):
    root = tmp_path / "case"
    target = case.build(root)
    with pytest.raises(case.error) as info:
        case.action(target)
    message = str(info.value)
    assert case.message in message, message
    assert (case.names_file or target.name) in message, message
    assert not Path("/tmp/medseg-pwned").exists()


def test_corpus_is_large_enough():
    handled = [
        mixed_series_are_separated,
        blank_uids_use_fallback_grouping,
        rgb_image_becomes_grey,
        symlink_loop_and_broken_link,
        non_utf8_file_name,
        unreadable_file_in_folder,
    ]
    assert len(CORPUS) + len(handled) >= 40


# --- inputs that are handled rather than refused ---------------------------------------


def mixed_series_are_separated(tmp_path):
    phantoms.write_dicom_series(phantoms.ct_phantom(shape=(12, 12, 4), seed=1), tmp_path / "x", series_description="a")
    for p in phantoms.write_dicom_series(
        phantoms.ct_phantom(shape=(10, 12, 5), seed=2), tmp_path / "y", series_description="b", seed=7
    ):
        shutil.move(p, tmp_path / "x" / f"b_{p.name}")
    found = discover(tmp_path / "x")
    assert sorted(len(s.paths) for s in found.scans) == [4, 5] and not found.problems


def blank_uids_use_fallback_grouping(tmp_path):
    phantoms.write_dicom_series(phantoms.ct_phantom(shape=(12, 12, 4)), tmp_path / "x", series_uid=None)
    found = discover(tmp_path / "x")
    assert len(found.scans) == 1 and len(found.scans[0].paths) == 4


def rgb_image_becomes_grey(tmp_path):
    Image.fromarray(np.full((6, 5, 3), 100, np.uint8)).save(tmp_path / "rgb.png")
    scan = load(ref_for_path(tmp_path / "rgb.png"))
    assert scan.channels == 1 and "RGB converted to grey" in scan.notes


def symlink_loop_and_broken_link(tmp_path):
    _nifti(tmp_path / "d", np.zeros((4, 4, 4), np.uint8), "ok.nii.gz")
    (tmp_path / "d" / "loop").symlink_to(tmp_path / "d", target_is_directory=True)
    (tmp_path / "d" / "gone.nii.gz").symlink_to(tmp_path / "d" / "missing.nii.gz")
    found = discover(tmp_path / "d")
    assert [s.id for s in found.scans] == ["ok"]
    assert any("broken symbolic link" in p.reason for p in found.skipped)


def non_utf8_file_name(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    name = os.fsdecode(b"scan_\xff\xfe.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), folder / name)
    found = discover(folder)
    assert len(found.scans) == 1
    scan = load(found.scans[0])
    import json

    json.dumps(scan.summary())  # reports stay writable


def unreadable_file_in_folder(tmp_path, monkeypatch):
    folder = tmp_path / "d"
    _nifti(folder, np.zeros((4, 4, 4), np.uint8), "ok.nii.gz")
    target = _nifti(folder, np.zeros((4, 4, 4), np.uint8), "locked.nii.gz")
    import builtins

    real_open = builtins.open

    def guarded(file, *args, **kwargs):
        if str(file) == str(target):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)
    found = discover(folder)
    assert [s.id for s in found.scans] == ["ok"]
    assert "cannot read file (Permission denied)" in found.problems[0].reason


@pytest.mark.parametrize(
    "check",
    [
        mixed_series_are_separated,
        blank_uids_use_fallback_grouping,
        rgb_image_becomes_grey,
        symlink_loop_and_broken_link,
        non_utf8_file_name,
        unreadable_file_in_folder,
    ],
    ids=lambda f: f.__name__,
)
def test_handled_inputs(check, tmp_path, request):
    if "monkeypatch" in check.__code__.co_varnames[: check.__code__.co_argcount]:
        check(tmp_path, request.getfixturevalue("monkeypatch"))
    else:
        check(tmp_path)
