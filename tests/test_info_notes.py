"""Notes on what a scan's files say about its voxels (issue #16 item 5): slice thickness against
slice spacing, obliquity, compression, blank identifiers and assumed sizes, exactly as
`medseg info --json` and `medseg info` show them, as predictions.json records them and as the
review page shows them beside each case."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pydicom.uid import RLELossless

from medseg.data import phantoms
from medseg.training.checkpoint import Checkpoint, save_checkpoint
from medseg.cli import main
from medseg.geometry import Geometry, grid_notes, obliquity_degrees
from medseg.inference.predictor import Predictor
from medseg.pipeline import segment_folder
from medseg.review import write_review

OVERLAP = "slices 3.0 mm thick every 2.0 mm: they overlap by 1.0 mm"
GAPS = "slices 5.0 mm thick every 6.5 mm: 1.5 mm gaps between them"
RLE = "pixels compressed: RLE Lossless (1.2.840.10008.1.2.5)"
J2K = "pixels compressed: JPEG 2000 Image Compression (Lossless Only) (1.2.840.10008.1.2.4.90)"
SERIES_UID = (
    "SeriesInstanceUID blank, malformed or duplicated in the files: generated from the file contents "
    "(the same on every read) so that a DICOM SEG can reference the series; see metadata generated_uids"
)


def _unusable(shown: str, spacing: str = "2.0") -> str:
    return (
        f"SliceThickness {shown!r} is unusable (not a positive number), so whether slices overlap or leave gaps "
        f"is unknown; the {spacing} mm slice spacing comes from the slice positions"
    )


def _malformed(keyword: str) -> str:
    """The identifier reader's note on a value its VR does not allow (it reaches info too, and only once)."""
    return (
        f"{keyword} not valid for their DICOM value representation: a DICOM SEG leaves them out (or empty, where "
        "DICOM type 2 requires them)"
    )


def _oblique(degrees: str) -> str:
    return f"oblique: axes {degrees} degrees from the patient axes"


def _series(folder: Path, spacing_z: float = 2.0, shape=(16, 16, 4), oblique=None, **options) -> list[Path]:
    phantom = phantoms.ct_phantom(shape=shape, spacing=(1.0, 1.0, spacing_z), oblique=oblique)
    return phantoms.write_dicom_series(phantom, folder, **options)


def _edit(paths: list[Path], **tags: str | None) -> None:
    """Store each tag as the text given (None: delete it), as a careless or broken writer would."""
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword, text in tags.items():
            tag = pydicom.datadict.tag_for_keyword(keyword)
            if text is None:
                if tag in ds:
                    del ds[tag]
            else:  # raw bytes: pydicom would refuse to build a DS element from 'thick'
                raw = text.encode("ascii") + b" " * (len(text) % 2)
                ds[tag] = RawDataElement(Tag(tag), pydicom.datadict.dictionary_VR(tag), len(raw), raw, 0, False, True)
        with warnings.catch_warnings():  # pydicom warns about the very values these tests plant
            warnings.simplefilter("ignore")
            ds.save_as(path)


def _info(path: Path, capsys) -> dict:
    """The one scan `medseg info --json` lists under ``path``."""
    assert main(["info", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["scans"]) == 1 and not report["problems"], report
    return report["scans"][0]


# --- slice thickness against slice spacing ------------------------------------------------------


@pytest.mark.parametrize(
    "thickness, spacing_z, expected",
    [
        ("3.0", 2.0, [OVERLAP]),
        ("5", 6.5, [GAPS]),
        ("0.625", 1.25, ["slices 0.625 mm thick every 1.25 mm: 0.625 mm gaps between them"]),
        ("2.03", 2.0, []),  # within the tolerance (0.01 mm + 2 % of the spacing): the same
        ("2.0", 2.0, []),
        (None, 2.0, []),  # no SliceThickness: nothing to compare
        ("", 2.0, []),
        ("0", 2.0, [_unusable("0")]),
        ("-2", 2.0, [_unusable("-2")]),
        ("nan", 2.0, [_unusable("nan"), _malformed("SliceThickness")]),
        ("inf", 2.0, [_unusable("inf"), _malformed("SliceThickness")]),
        ("thick", 2.0, [_unusable("thick"), _malformed("SliceThickness")]),
    ],
)
def test_slice_thickness_against_slice_spacing(tmp_path, capsys, thickness, spacing_z, expected):
    paths = _series(tmp_path / "ct", spacing_z=spacing_z)
    _edit(paths, SliceThickness=thickness)
    scan = _info(tmp_path / "ct", capsys)
    assert scan["notes"] == expected
    assert scan["spacing"][2] == pytest.approx(spacing_z)  # the grid keeps the positions' spacing either way


def test_enhanced_multiframe_thickness_comes_from_the_functional_groups(tmp_path, capsys):
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    paths = _series(tmp_path / "ct", spacing_z=6.5)
    _edit(paths, SliceThickness="5")
    enhanced = LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(p) for p in paths],
        series_instance_uid=pydicom.uid.generate_uid(),
        series_number=2,
        sop_instance_uid=pydicom.uid.generate_uid(),
        instance_number=1,
    )
    assert "SliceThickness" not in enhanced  # only in the pixel measures: the reader must look there
    (tmp_path / "mf").mkdir()
    enhanced.save_as(tmp_path / "mf" / "enhanced.dcm")
    assert GAPS in _info(tmp_path / "mf" / "enhanced.dcm", capsys)["notes"]


# --- obliquity -----------------------------------------------------------------------------------


OBLIQUE_CASES = [
    ((18.2, 0.0, 0.0), [_oblique("18.2")]),
    ((0.0, 0.0, 30.0), [_oblique("30.0")]),
    ((0.0, -7.5, 0.0), [_oblique("7.5")]),
    ((90.0, 0.0, 0.0), []),  # axes swapped and flipped, still along the patient axes
    ((0.0, 90.0, 180.0), []),
    ((0.0, 0.0, 0.01), []),  # rounding, not obliquity
    (None, []),
]


@pytest.mark.parametrize("oblique, expected", OBLIQUE_CASES)
def test_dicom_obliquity(tmp_path, capsys, oblique, expected):
    _series(tmp_path / "ct", oblique=oblique)
    assert _info(tmp_path / "ct", capsys)["notes"] == expected


@pytest.mark.parametrize("oblique, expected", OBLIQUE_CASES)
def test_nifti_obliquity(tmp_path, capsys, oblique, expected):
    phantom = phantoms.ct_phantom(shape=(12, 10, 8), oblique=oblique)
    phantoms.write_nifti(phantom.image, phantom.affine, tmp_path / "ct.nii.gz")
    assert _info(tmp_path / "ct.nii.gz", capsys)["notes"] == expected


def test_compound_rotation_reports_the_axis_farthest_from_its_patient_axis():
    """Rotating 10 degrees about x, then 20 about z: x tilts 20 degrees, y about 22.2, z 10."""
    affine = np.eye(4)
    affine[:3, :3] = phantoms.rotation((10.0, 0.0, 20.0)) @ np.diag([0.5, 0.5, 3.0])
    direction = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    by_hand = max(np.degrees(np.arccos(np.abs(direction[:, axis]).max())) for axis in range(3))
    assert obliquity_degrees(affine) == pytest.approx(by_hand)
    assert 22.0 < by_hand < 22.5 and grid_notes(affine) == (_oblique(f"{by_hand:.1f}"),)


def test_a_rebuilt_grid_never_carries_a_stale_oblique_note():
    tilted = np.eye(4)
    tilted[:3, :3] = phantoms.rotation((0.0, 0.0, 25.0))
    oblique = Geometry(tilted, (4, 4, 4), notes=("read from somewhere",))
    assert oblique.notes == ("read from somewhere", _oblique("25.0"))
    straight = Geometry(np.eye(4), oblique.shape, oblique.spacing_known, oblique.notes)
    assert straight.notes == ("read from somewhere",)
    again = Geometry(tilted, oblique.shape, oblique.spacing_known, oblique.notes)
    assert again.notes == oblique.notes  # recomputed once, not repeated


# --- compression, identifiers, assumptions --------------------------------------------------------


@pytest.mark.parametrize("syntax, note", [("rle", RLE), ("jpeg2000", J2K)])
def test_compressed_pixels_are_named(tmp_path, capsys, syntax, note):
    _series(tmp_path / "ct", shape=(32, 32, 3), transfer_syntax=syntax)
    assert _info(tmp_path / "ct", capsys)["notes"] == [note]


def test_a_partly_compressed_series_says_how_many_files(tmp_path, capsys):
    paths = _series(tmp_path / "ct")
    for path in paths[:3]:
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)
        ds.save_as(path)
    assert _info(tmp_path / "ct", capsys)["notes"] == [f"{RLE} in 3 of 4 files"]


def test_blank_identifiers_and_missing_patient_attributes_are_noted_once(tmp_path, capsys):
    paths = _series(tmp_path / "ct", series_uid=None)
    _edit(paths, PatientID=None, StudyDate=None)
    assert _info(tmp_path / "ct", capsys)["notes"] == [
        SERIES_UID,
        "PatientID, StudyDate missing from the header: a DICOM SEG carries them empty (DICOM type 2)",
    ]


def test_assumed_pixel_sizes_are_noted(tmp_path, capsys):
    paths = _series(tmp_path / "none")
    _edit(paths, PixelSpacing=None)
    unknown = _info(tmp_path / "none", capsys)
    assert unknown["notes"] == ["no PixelSpacing in the header: in-plane pixel size set to 1 mm"]
    paths = _series(tmp_path / "imager")
    _edit(paths, PixelSpacing=None, ImagerPixelSpacing="0.7\\0.7")
    scan = _info(tmp_path / "imager", capsys)
    assert scan["notes"] == [
        "no PixelSpacing in the header: ImagerPixelSpacing (measured at the detector) taken as the pixel size, "
        "so sizes in the patient are overstated by the X-ray geometric magnification"
    ]
    assert scan["spacing"][:2] == pytest.approx([0.7, 0.7])


def test_text_listing_shows_every_note(tmp_path, capsys):
    paths = _series(tmp_path / "ct", shape=(32, 32, 4), oblique=(18.2, 0.0, 0.0), transfer_syntax="rle")
    _edit(paths, SliceThickness="3")
    assert main(["info", str(tmp_path / "ct")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if line.startswith("  note: ")] == [
        f"  note: {OVERLAP}",
        f"  note: {RLE}",
        f"  note: {_oblique('18.2')}",
    ]


# --- predictions.json and the review page ---------------------------------------------------------


@pytest.fixture(scope="module")
def predicted(tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    """A batch of a DICOM series with every quirk and an oblique NIfTI, predicted with an untrained
    tiny 3D U-Net; returns the output folder and the notes `medseg info --json` gives per case."""
    from medseg.config import config_from_dict
    from medseg.models import build_model

    root = tmp_path_factory.mktemp("notes")
    paths = _series(
        root / "in" / "quirky", shape=(32, 32, 4), oblique=(18.2, 0.0, 0.0), transfer_syntax="rle", series_uid=None
    )
    _edit(paths, SliceThickness="3")
    phantom = phantoms.ct_phantom(shape=(12, 10, 8), oblique=(0.0, 0.0, 30.0))
    phantoms.write_nifti(phantom.image, phantom.affine, root / "in" / "tilted.nii.gz")
    config = config_from_dict(
        {
            "data": {"classes": {"background": 0, "organ": 1}},
            "preprocess": {"orientation": "RAS", "spacing": [2.0, 2.0, 2.0]},
            "model": {"name": "unet", "spatial_dims": 3, "features": 4, "depth": 2},
            "train": {"patch_size": [16, 16, 16]},
        }
    )
    save_checkpoint(Checkpoint(config, build_model(config.model).state_dict()), root / "m.pt")
    report = segment_folder(Predictor(root / "m.pt"), root / "in", root / "out", progress=False)
    assert not report.failed and not report.stopped, [r.reason for r in report.failed] or report.stopped
    expected = {
        "quirky": [OVERLAP, RLE, SERIES_UID, _oblique("18.2")],
        "tilted": [_oblique("30.0")],
    }
    return root / "out", expected


def test_info_notes_reach_predictions_json(predicted, capsys):
    out, expected = predicted
    records = {r["case"]: r for r in json.loads((out / "predictions.json").read_text())["records"]}
    assert {case: r["status"] for case, r in records.items()} == {"quirky": "written", "tilted": "written"}
    assert {case: r["notes"] for case, r in records.items()} == expected
    info = {case: _info(Path(records[case]["input"]), capsys)["notes"] for case in records}
    assert info == expected  # one source: what info shows is what the batch records


def test_review_page_shows_each_cases_notes(predicted):
    out, expected = predicted
    page = (out / "review.html").read_text()
    data = json.loads(
        re.search(r'<script id="review-data" type="application/json">(.*?)</script>', page, re.DOTALL).group(1)
    )
    for entry in data["cases"]:
        assert entry["notes"][: len(expected[entry["id"]])] == expected[entry["id"]]
        text = (out / entry["file"]).read_text()
        payload = json.loads(text[len("medsegReview.receive(") : text.rstrip().rindex(")")])
        assert payload["notes"][: len(expected[entry["id"]])] == expected[entry["id"]]


def test_review_page_keeps_only_bounded_strings_from_a_crafted_record(predicted, tmp_path):
    """predictions.json is untrusted: notes that are not a list of strings are dropped, long ones cut, many capped."""
    out, _ = predicted
    crafted = tmp_path / "out"
    crafted.mkdir()
    batch = json.loads((out / "predictions.json").read_text())
    batch["records"][0]["notes"] = ["<script>alert(1)</script>", 7, None, {"a": 1}, "x" * 5000] + ["n"] * 200
    batch["records"][1]["notes"] = "not a list"
    (crafted / "predictions.json").write_text(json.dumps(batch))
    page = write_review(crafted, progress=False).read_text()
    assert "<script>alert(1)</script>" not in page
    data = json.loads(
        re.search(r'<script id="review-data" type="application/json">(.*?)</script>', page, re.DOTALL).group(1)
    )
    first, second = data["cases"]
    # the first 50 entries, strings only (2 + 45), then the page's own notes on the case
    assert first["notes"][:47] == ["<script>alert(1)</script>", "x" * 1000] + ["n"] * 45
    assert "n" not in first["notes"][47:]
    assert "not a list" not in second["notes"] and "n" not in second["notes"]  # not taken whole, nor by letter
