"""DICOM SEG from series as real exports leave them: blank UIDs, missing attributes, MR, compression, multi-frame.

Every SEG written here is read back twice, by highdicom and by plain pydicom (frame by
frame, through the per-frame source references), and must give the mask's label map;
and it must pass dciodvfy (Debian's dicom3tools) without errors. Without dciodvfy the
read-back checks still run and the test then skips, saying how to install it.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.sr.codedict import codes
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    MRImageStorage,
    SecondaryCaptureImageStorage,
)

from medseg.data import phantoms
from medseg.cli import main
from medseg.config import config_from_dict
from medseg.export.dicom_seg import series_description, write_dicom_seg
from medseg.errors import ConfigError
from medseg.export import ExportError
from medseg.ingest import discover, load, ref_for_path
from medseg.ingest.dicom_headers import PATIENT_STUDY_ATTRIBUTES
from medseg.export.seg_coding import known_names, normalise_name, segment_coding

from conftest import dciodvfy as _dciodvfy
from conftest import enhanced_multiframe

CT_CLASSES = phantoms.CT_CLASSES  # background 0, liver 1, kidney 2, spine 3
# dciodvfy warns (never errs) when a Type 2 attribute is empty that a DICOMDIR would index.
DICOMDIR_WARNING = "Warning - Missing attribute or value that would be needed to build DICOMDIR"


# --- building quirky series ---------------------------------------------------------------


def _series(tmp_path: Path, name: str, edit=None, shape=(40, 36, 6), oblique=None, syntax="explicit"):
    """A CT phantom written as a DICOM series, each file then edited by ``edit(ds, index)``."""
    truth = phantoms.ct_phantom(shape=shape, oblique=oblique, seed=4)
    folder = tmp_path / "in" / name
    paths = phantoms.write_dicom_series(truth, folder, transfer_syntax=syntax, series_description=f"quirk {name}")
    for index, path in enumerate(paths):
        if edit is not None:
            ds = pydicom.dcmread(path)
            edit(ds, index)
            ds.save_as(path)
    return truth, folder


def _blank_uids(ds, index):
    for keyword in ("SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(ds, keyword, "")
    ds.file_meta.MediaStorageSOPClassUID = ""
    ds.file_meta.MediaStorageSOPInstanceUID = ""


def _no_frame_of_reference(ds, index):
    del ds.FrameOfReferenceUID


def _no_patient_or_study(ds, index):
    for keyword in PATIENT_STUDY_ATTRIBUTES:
        if keyword in ds:
            delattr(ds, keyword)


def _as_mr(ds, index):
    _blank_uids(ds, index)
    ds.Modality = "MR"
    del ds.KVP
    ds.EchoTime, ds.RepetitionTime, ds.MagneticFieldStrength = "12", "500", "3"
    ds.ScanningSequence, ds.SequenceVariant = "SE", "NONE"


def _unknown_modality(ds, index):
    _blank_uids(ds, index)
    ds.Modality = "OT"
    del ds.KVP


def _duplicate_sop_uids(ds, index):
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"


def _malformed_patient_and_study(ds, index):
    with warnings.catch_warnings():  # pydicom warns while writing the values this test wants written
        warnings.simplefilter("ignore")
        ds.StudyDate, ds.StudyTime, ds.PatientBirthDate = "01/02/2020", "12h30", "19700101xx"
        ds.PatientSex, ds.PatientAge = "male", "forty"
        ds.PatientName, ds.PatientID, ds.StudyID = "A" * 100, "x" * 80, "z" * 30


def _everything_blank(ds, index):
    _blank_uids(ds, index)
    _no_frame_of_reference(ds, index)
    _no_patient_or_study(ds, index)


QUIRKS = {
    # name: (edit, series options, SOP class the SEG must reference: None = the file's own)
    "blank-uids": (_blank_uids, {}, CTImageStorage),
    "no-frame-of-reference": (_no_frame_of_reference, {}, None),
    "no-patient-or-study": (_no_patient_or_study, {}, None),
    "mr-blank-class": (_as_mr, {}, MRImageStorage),
    "unknown-modality": (_unknown_modality, {}, SecondaryCaptureImageStorage),
    "duplicate-sop-uids": (_duplicate_sop_uids, {}, None),
    "malformed-patient-and-study": (_malformed_patient_and_study, {}, None),
    "jpeg2000-oblique-all-blank": (
        _everything_blank,
        {"syntax": "jpeg2000", "oblique": (20.0, -10.0, 15.0)},
        CTImageStorage,
    ),
    "rle-all-blank": (_everything_blank, {"syntax": "rle"}, CTImageStorage),
    "oblique": (None, {"oblique": (25.0, -15.0, 30.0)}, None),
}


# --- reading SEGs back --------------------------------------------------------------------


def _load(folder: Path):
    found = discover(folder)
    assert not found.problems, found.problems
    assert len(found.scans) == 1, found.scans
    return load(found.scans[0])


def _segment_numbers(mask: np.ndarray, classes) -> np.ndarray:
    """The mask as segment numbers (class order, background excluded), (slice, row, column)."""
    numbers = np.zeros(mask.shape, np.uint16)
    for number, value in enumerate([v for v in classes.values() if v != 0], start=1):
        numbers[mask == value] = number
    return np.transpose(numbers, (2, 1, 0))


def _pydicom_label_map(path: Path, scan) -> np.ndarray:
    """The SEG's label map from plain pydicom: each frame placed by its source reference."""
    ds = pydicom.dcmread(path)
    frames = ds.pixel_array
    frames = frames[None] if frames.ndim == 2 else frames
    frame_order = scan.metadata["frame_order"]
    slices = len(frame_order) or len(scan.metadata["sop_instance_uids"])
    slice_of_uid = {uid: k for k, uid in enumerate(scan.metadata["sop_instance_uids"])}
    slice_of_frame = {frame: k for k, frame in enumerate(frame_order)}
    label = np.zeros((slices, int(ds.Rows), int(ds.Columns)), np.uint16)
    for i, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
        segment = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        source = group.DerivationImageSequence[0].SourceImageSequence[0]
        if frame_order:
            assert source.ReferencedSOPInstanceUID == scan.metadata["sop_instance_uids"][0]
            k = slice_of_frame[int(source.ReferencedFrameNumber)]
        else:
            k = slice_of_uid[source.ReferencedSOPInstanceUID]
        label[k][frames[i] > 0] = segment
    return label


def _write_and_verify(scan, mask, out: Path, classes=CT_CLASSES, **kw) -> pydicom.Dataset:
    """Write a SEG, then read it back with highdicom and pydicom and check every reference."""
    write_dicom_seg(mask, scan, out, classes, **kw)
    expected = _segment_numbers(mask, classes)
    seg = hd.seg.segread(out)
    meta = scan.metadata
    if meta["frame_order"]:
        by_highdicom = seg.get_pixels_by_source_frame(
            meta["sop_instance_uids"][0], meta["frame_order"], combine_segments=True
        )
    else:
        by_highdicom = seg.get_pixels_by_source_instance(meta["sop_instance_uids"], combine_segments=True)
    assert np.array_equal(by_highdicom, expected)
    assert np.array_equal(_pydicom_label_map(out, scan), expected)
    ds = pydicom.dcmread(out)
    assert ds.StudyInstanceUID == meta["study_instance_uid"]
    assert str(ds.get("FrameOfReferenceUID", "")) == meta["frame_of_reference_uid"]
    referenced = ds.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == meta["series_instance_uid"]
    items = referenced.ReferencedInstanceSequence
    assert sorted(i.ReferencedSOPInstanceUID for i in items) == sorted(meta["sop_instance_uids"])
    assert {i.ReferencedSOPClassUID for i in items} == {meta["sop_class_uid"]}
    return ds


# --- quirky series, one per kind of real-world export ----------------------------------------


@pytest.mark.parametrize("quirk", list(QUIRKS))
def test_quirky_series_give_a_valid_seg_equal_to_the_mask(tmp_path, quirk):
    edit, options, sop_class = QUIRKS[quirk]
    truth, folder = _series(tmp_path, quirk, edit, **options)
    scan = _load(folder)
    meta = scan.metadata
    uids = meta["sop_instance_uids"]
    assert len(set(uids)) == len(uids) == truth.image.shape[2]
    assert all(pydicom.uid.UID(u).is_valid for u in uids)
    for key in ("study_instance_uid", "series_instance_uid", "frame_of_reference_uid", "sop_class_uid"):
        assert pydicom.uid.UID(meta[key]).is_valid, key
    if sop_class is not None:
        assert meta["sop_class_uid"] == sop_class
    out = tmp_path / "out" / f"{quirk}.seg.dcm"
    ds = _write_and_verify(scan, truth.label, out)
    assert ds.SeriesDescription == f"medseg: liver, kidney, spine on quirk {quirk}"[:64]
    warnings = _dciodvfy(out)
    if meta["missing_attributes"] or meta["malformed_attributes"]:  # now empty: a DICOMDIR could not index them
        assert warnings and all(w.startswith(DICOMDIR_WARNING) for w in warnings), warnings
    else:
        assert warnings == [], warnings


def test_generated_uids_are_recorded_and_the_same_on_every_read(tmp_path):
    _, folder = _series(tmp_path, "blank", _everything_blank)
    first = _load(folder)
    copy = tmp_path / "elsewhere" / "renamed"
    shutil.copytree(folder, copy)
    for i, path in enumerate(sorted(copy.iterdir())):  # other names, other folder: same contents
        path.rename(copy / f"slice_{i:03d}.dcm")
    for again in (_load(folder), _load(copy)):
        for key in (
            "sop_instance_uids",
            "study_instance_uid",
            "series_instance_uid",
            "frame_of_reference_uid",
            "generated_uids",
        ):
            assert again.metadata[key] == first.metadata[key], key
    generated = first.metadata["generated_uids"]
    assert set(generated) == {
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "FrameOfReferenceUID",
        "SOPClassUID",
    }
    assert generated["SOPInstanceUID"] == first.metadata["sop_instance_uids"]
    assert generated["SOPClassUID"] == CTImageStorage
    assert first.metadata["missing_attributes"] == list(PATIENT_STUDY_ATTRIBUTES)
    notes = " | ".join(first.notes)
    assert "SOPInstanceUID (6 of 6 files)" in notes and "FrameOfReferenceUID" in notes
    assert "CT Image Storage" in notes
    assert "PatientID" in notes and "DICOM type 2" in notes


def test_valid_uids_are_kept_unchanged(tmp_path):
    _, folder = _series(tmp_path, "plain")
    scan = _load(folder)
    files = [pydicom.dcmread(p) for p in scan.ref.paths]
    assert set(scan.metadata["sop_instance_uids"]) == {str(ds.SOPInstanceUID) for ds in files}
    assert scan.metadata["generated_uids"] == {}
    assert scan.metadata["missing_attributes"] == []
    assert not any("generated" in note for note in scan.notes)


def test_single_slice_without_patient_geometry(tmp_path):
    def strip(ds, index):
        _blank_uids(ds, index)
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "FrameOfReferenceUID"):
            delattr(ds, keyword)

    truth, folder = _series(tmp_path, "flat", strip, shape=(40, 36, 1))
    scan = _load(folder)
    assert scan.metadata["sop_class_uid"] == SecondaryCaptureImageStorage  # CT needs the image plane
    assert scan.metadata["frame_of_reference_uid"] == ""  # nothing to anchor: none invented
    out = tmp_path / "out" / "flat.seg.dcm"
    ds = _write_and_verify(scan, truth.label, out)
    assert "FrameOfReferenceUID" not in ds
    assert _dciodvfy(out) == []


def test_enhanced_multiframe_with_blank_identifiers(tmp_path):
    truth = phantoms.ct_phantom(shape=(40, 36, 6), oblique=(10.0, 5.0, -20.0), seed=6)
    paths = phantoms.write_dicom_series(truth, tmp_path / "single")

    def blank(enhanced):
        for keyword in ("SOPClassUID", "StudyInstanceUID", "SOPInstanceUID"):
            setattr(enhanced, keyword, "")
        enhanced.file_meta.MediaStorageSOPClassUID = enhanced.file_meta.MediaStorageSOPInstanceUID = ""

    path = enhanced_multiframe(paths, tmp_path / "mf" / "enhanced.dcm", blank)
    scan = load(ref_for_path(path))
    assert len(scan.metadata["frame_order"]) == 6
    assert scan.metadata["sop_class_uid"] == EnhancedCTImageStorage  # Modality CT + per-frame groups
    out = tmp_path / "out" / "mf.seg.dcm"
    _write_and_verify(scan, truth.label, out)
    assert _dciodvfy(out) == []


@pytest.mark.parametrize(
    "name", ["CT_small.dcm", "MR_small.dcm", "MR_small_jp2klossless.dcm", "MR_small_bigendian.dcm"]
)
def test_pydicom_sample_files(tmp_path, name):
    copy = tmp_path / "in" / name
    copy.parent.mkdir()
    shutil.copy(get_testdata_file(name), copy)
    scan = load(ref_for_path(copy))
    image = scan.array[0]
    mask = np.where(image > np.percentile(image, 70), 1, 0) + np.where(image > np.percentile(image, 95), 1, 0)
    classes = {"background": 0, "tissue": 1, "lesion": 2}
    out = tmp_path / "out" / "sample.seg.dcm"
    _write_and_verify(scan, mask.astype(np.uint8), out, classes)
    _dciodvfy(out)  # the samples' own headers carry odd values into the SEG: warnings allowed, no errors


# --- what cannot become a SEG is an ExportError naming the file ------------------------------


def test_multiframe_without_geometry_is_an_export_error(tmp_path):
    scan = load(ref_for_path(Path(get_testdata_file("examples_ybr_color.dcm"))))  # 30 frames, no geometry
    out = tmp_path / "out" / "us.seg.dcm"
    with pytest.raises(ExportError, match="needs patient geometry") as info:
        write_dicom_seg(np.zeros(scan.geometry.shape, np.uint8), scan, out, {"background": 0, "heart": 1})
    assert str(out) in str(info.value) and str(info.value).count(". ") <= 1
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_library_errors_become_export_errors(tmp_path, monkeypatch):
    truth, folder = _series(tmp_path, "ok")
    scan = _load(folder)

    def crash(*args, **kwargs):
        raise KeyError("")  # what highdicom raised for a blank SOPClassUID

    monkeypatch.setattr(hd.seg, "Segmentation", crash)
    out = tmp_path / "out" / "x.seg.dcm"
    with pytest.raises(ExportError, match="highdicom cannot build a DICOM SEG") as info:
        write_dicom_seg(truth.label, scan, out, CT_CLASSES)
    assert str(out) in str(info.value)
    assert not out.exists()


def test_series_changed_on_disk_is_an_export_error(tmp_path):
    truth, folder = _series(tmp_path, "changing")
    scan = _load(folder)
    victim = sorted(folder.iterdir())[2]
    ds = pydicom.dcmread(victim)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(victim)
    with pytest.raises(ExportError, match="changed on disk"):
        write_dicom_seg(truth.label, scan, tmp_path / "out" / "x.seg.dcm", CT_CLASSES)


def test_mask_values_without_a_class_are_an_export_error(tmp_path):
    truth, folder = _series(tmp_path, "stray")
    scan = _load(folder)
    mask = truth.label.copy()
    mask[0, 0, 0] = 7
    with pytest.raises(ExportError, match=r"label values \[7\]"):
        write_dicom_seg(mask, scan, tmp_path / "out" / "x.seg.dcm", CT_CLASSES)


def test_export_module_reexports_the_writer():
    import medseg.export.dicom_seg
    import medseg.export

    assert medseg.export.write_dicom_seg is medseg.export.dicom_seg.write_dicom_seg


# --- segment coding ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "category", "type_value", "modifier"),
    [
        ("liver", "91723000", "10200004", None),
        ("Spleen", "91723000", "78961009", None),
        ("kidney_left", "91723000", "64033007", "7771000"),
        ("Right-Kidneys", "91723000", "64033007", "24028007"),
        ("lungs", "91723000", "39607008", None),
        ("hippocampus_anterior", "91723000", "5366008", None),
        ("Posterior hippocampus", "91723000", "5366008", None),
        ("urinary bladder", "91723000", "89837001", None),
        ("Tumour", "49755003", "108369006", None),
        ("lesions", "49755003", "52988006", None),
        ("nuclei", "91723000", "84640000", None),
        ("cells", "91723000", "4421005", None),
        ("left ventricle", "91723000", "87878005", None),  # a structure named with a side, not a modifier
        ("adipose_tissue", "85756007", "55603005", None),
        ("CSF", "91720002", "65216001", None),
    ],
)
def test_known_names_get_snomed_codes(name, category, type_value, modifier):
    coded = segment_coding(name)
    assert coded.known and coded.label == name
    assert (coded.category.value, coded.category.scheme_designator) == (category, "SCT")
    assert coded.type.value == type_value
    assert (coded.modifier.value if coded.modifier else None) == modifier


def test_unknown_names_fall_back_to_generic_tissue_with_their_own_label():
    for name in ("anterior", "membrane", "widget_7"):
        coded = segment_coding(name)
        assert not coded.known
        assert coded.label == name
        assert coded.category == codes.SCT.Tissue and coded.type == codes.SCT.Tissue
        assert coded.modifier is None


def test_shipped_table_is_broad_and_uses_dicom_segmentation_categories():
    names = known_names()
    assert len({segment_coding(n).type.value for n in names}) >= 40
    categories = {c.value for c in (codes.cid7150.concepts.values())}
    for name in names:
        coded = segment_coding(name)
        assert coded.category.value in categories, name
        assert normalise_name(name) == name  # the table is written in its own normal form


def _coding_config(coding: dict) -> dict:
    return {
        "data": {"classes": {"background": 0, "organ": 1, "liver": 2}, "classes_coding": coding},
        "model": {"name": "unet", "spatial_dims": 2, "out_channels": 3},
    }


ORGAN_CODING = {
    "organ": {
        "category": {"value": "91723000", "scheme": "SCT", "meaning": "Anatomical Structure"},
        "type": {"value": "15776009", "scheme": "SCT", "meaning": "Pancreas"},
        "modifier": {"value": "24028007", "scheme": "SCT", "meaning": "Right"},
    }
}


def test_config_classes_coding_overrides_the_table_and_reaches_the_seg(tmp_path):
    config = config_from_dict(_coding_config(ORGAN_CODING))
    coded = segment_coding("organ", config.data.classes_coding)
    assert (coded.type.value, coded.type.meaning, coded.modifier.meaning) == ("15776009", "Pancreas", "Right")
    assert segment_coding("liver", config.data.classes_coding).type.value == "10200004"  # the rest: from the table

    truth, folder = _series(tmp_path, "coded")
    scan = _load(folder)
    classes = {"background": 0, "organ": 1, "liver": 2}
    mask = np.where(truth.label == 1, 2, np.where(truth.label == 2, 1, 0)).astype(np.uint8)
    out = tmp_path / "out" / "coded.seg.dcm"
    ds = _write_and_verify(scan, mask, out, classes, coding=config.data.classes_coding, algorithm="ct-organs")
    organ, liver = ds.SegmentSequence
    assert organ.SegmentLabel == "organ" and liver.SegmentLabel == "liver"
    organ_type = organ.SegmentedPropertyTypeCodeSequence[0]
    assert organ_type.CodeValue == "15776009"
    assert organ_type.SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning == "Right"
    assert liver.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert liver.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
    algorithm = liver.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "ct-organs"
    from medseg import __version__

    assert algorithm.AlgorithmVersion == __version__ and ds.SoftwareVersions == __version__
    assert _dciodvfy(out) == []


@pytest.mark.parametrize(
    ("coding", "expected"),
    [
        ({"organs": ORGAN_CODING["organ"]}, "classes_coding names ['organs']"),
        (
            {"organ": {**ORGAN_CODING["organ"], "type": {"value": "", "scheme": "SCT", "meaning": "x"}}},
            "data.classes_coding.organ.type.value: .*must not be empty",
        ),
        ({"organ": {**ORGAN_CODING["organ"], "type": {"value": "1", "scheme": "SCT", "meaning": "a\\b"}}}, "backslash"),
        ({"organ": {"type": ORGAN_CODING["organ"]["type"]}}, "data.classes_coding.organ.category: .*missing"),
    ],
)
def test_bad_classes_coding_is_a_config_error_naming_the_key(coding, expected):
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        config_from_dict(_coding_config(coding))


def test_series_description_is_a_valid_lo_of_at_most_64_characters():
    assert series_description(["liver", "spleen"], "CT abdomen") == "medseg: liver, spleen on CT abdomen"
    assert series_description(["liver"], "") == "medseg: liver"
    long = series_description([f"structure_{i}" for i in range(10)], "a\\b\x00c" * 10)
    assert len(long) <= 64 and "\\" not in long and "\x00" not in long


# --- quiet by default ---------------------------------------------------------------------------


@pytest.fixture
def library_log_levels():
    names = ("highdicom", "httpx", "distributed")
    before = {n: logging.getLogger(n).level for n in names}
    yield names
    for name, level in before.items():
        logging.getLogger(name).setLevel(level)


def test_library_info_logs_are_hidden_unless_verbose(tmp_path, caplog, library_log_levels):
    truth, folder = _series(tmp_path, "quiet")
    scan = _load(folder)
    for argv, shown in (([], False), (["-v"], True)):
        assert main(argv) == 2  # no command: help, after logging is set up
        for name in library_log_levels:
            assert logging.getLogger(name).level == (logging.NOTSET if shown else logging.WARNING)
        caplog.clear()
        with caplog.at_level(logging.DEBUG):
            write_dicom_seg(truth.label, scan, tmp_path / "out" / f"{shown}.seg.dcm", CT_CLASSES)
        from_highdicom = [r for r in caplog.records if r.name.startswith("highdicom") and r.levelno < logging.WARNING]
        assert bool(from_highdicom) == shown, len(from_highdicom)
