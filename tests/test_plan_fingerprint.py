"""The dataset fingerprint measured on phantoms, checked against direct computation; the memory count
of the planner checked against the tensors a real CPU step saves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from medseg.data import phantoms
from medseg.config import DataConfig
from medseg.data.datasets import find_cases
from medseg.errors import ConfigError
from medseg.models import build_model
from medseg.plan.fingerprint import Fingerprint, fingerprint_cases, measure_case
from medseg.plan.memory import training_step_memory


@pytest.fixture(scope="module")
def ct_folders(tmp_path_factory) -> tuple[Path, list[phantoms.Phantom]]:
    """Two CT phantoms: one a DICOM series (its header says CT), one NIfTI (no modality)."""
    root = tmp_path_factory.mktemp("ct")
    cases = [phantoms.ct_phantom(shape=(30, 26, 14), seed=1), phantoms.ct_phantom(shape=(34, 30, 16), seed=2)]
    phantoms.write_dicom_series(cases[0], root / "images" / "a")
    phantoms.write_nifti(cases[1].image, cases[1].affine, root / "images" / "b.nii.gz")
    for name, case in zip("ab", cases):
        phantoms.write_nifti(case.label, case.affine, root / "labels" / f"{name}.nii.gz")
    return root, cases


def test_fingerprint_of_phantoms_matches_direct_computation(ct_folders):
    root, cases = ct_folders
    found = find_cases(DataConfig(images=root / "images", labels=root / "labels"))
    fp = fingerprint_cases(found, "phantoms", progress=False)
    assert [c.id for c in fp.cases] == ["a", "b"] and fp.channels == 1 and fp.spatial_dims == 3
    assert [c.modality for c in fp.cases] == [["CT"], [""]] and fp.modalities == ["CT"]  # the header that says it
    for measured, truth in zip(fp.cases, cases):
        assert measured.shape == list(truth.image.shape) and measured.orientation == "RAS"
        assert measured.spacing == pytest.approx([0.9, 1.1, 2.5], rel=1e-4)
        values, counts = np.unique(truth.label, return_counts=True)
        assert measured.label_voxels == dict(zip(values.tolist(), counts.tolist()))
        for value in values[1:]:
            components, n = ndimage.label(truth.label == value, structure=np.ones((3, 3, 3)))
            sizes = np.bincount(components.ravel())[1:]
            assert measured.objects[int(value)] == [n, sizes.min(), int(np.median(sizes)), sizes.max()]
        foreground = truth.image[truth.label != 0].astype(float)  # fewer voxels than the sample: exact
        assert foreground.size < 10_000
        stats = measured.intensity[0]
        assert stats.samples == foreground.size and stats.mean == pytest.approx(foreground.mean(), rel=1e-5)
        assert stats.p99_5 == pytest.approx(np.percentile(foreground, 99.5), rel=1e-5)
        assert measured.image_range[0] == [truth.image.min(), truth.image.max()]
    both = np.concatenate([c.image[c.label != 0] for c in cases]).astype(float)
    assert fp.intensity[0].p00_5 == pytest.approx(np.percentile(both, 0.5), rel=1e-5)
    assert fp.label_values == [0, 1, 2, 3] and [c.value for c in fp.classes] == [0, 1, 2, 3]
    total = sum(c.label.size for c in cases)
    liver = sum(int((c.label == 1).sum()) for c in cases)
    assert fp.classes[1].voxel_fraction == pytest.approx(liver / total, rel=1e-5) and fp.classes[1].cases == 2
    again = Fingerprint.from_dict(json.loads(json.dumps(fp.to_dict())))  # the JSON beside the plan round-trips
    assert again == fp


def test_a_large_foreground_is_sampled_within_bounds():
    """200,000 foreground voxels, 10,000 sampled: the percentiles land within a few hundredths of the exact."""
    rng = np.random.default_rng(0)
    image = rng.normal(100.0, 20.0, size=(1, 80, 80, 40))
    label = np.ones((80, 80, 40), dtype=np.uint8)
    label[:5] = 0
    fp, drawn, _ = measure_case("x", "nifti", image, label, (1, 1, 1), True, "RAS", ["MR"], rng)
    exact = image[0][label != 0]
    assert fp.intensity[0].samples == 10_000 and drawn[0].size == 10_000
    assert fp.intensity[0].mean == pytest.approx(exact.mean(), abs=1.0)
    assert fp.intensity[0].p99_5 == pytest.approx(np.percentile(exact, 99.5), abs=2.0)
    assert fp.intensity[0].p00_5 == pytest.approx(np.percentile(exact, 0.5), abs=2.0)


def test_instance_maps_and_unlabelled_data_are_refused_in_a_sentence(tmp_path):
    label = np.arange(8 * 8 * 4).reshape(8, 8, 4) % 150
    with pytest.raises(ConfigError, match="holds 150 distinct values.*instance map"):
        measure_case("x", "nifti", np.zeros((1, 8, 8, 4)), label, (1, 1, 1), True, "RAS", [""], np.random.default_rng())
    ct = phantoms.ct_phantom(shape=(12, 10, 6))
    phantoms.write_nifti(ct.image, ct.affine, tmp_path / "images" / "a.nii.gz")
    (tmp_path / "labels").mkdir()
    cases = find_cases(DataConfig(images=tmp_path / "images", labels=tmp_path / "labels"))
    with pytest.raises(ConfigError, match="no case has a label"):
        fingerprint_cases(cases, str(tmp_path / "images"), progress=False)


def test_memory_counted_on_the_meta_device_is_what_a_real_step_saves():
    """Each tensor autograd saves in a real CPU forward, counted once per storage, plus the input and the
    loss's three logit-sized tensors, equals the meta-device count; the weights' part is 4 copies."""
    model = {
        "name": "unet",
        "spatial_dims": 3,
        "in_channels": 2,
        "out_channels": 3,
        "features": 4,
        "depth": 2,
        "options": {"norm": "instance", "dropout": 0.0},
    }
    patch = [16, 24, 16]
    counted = training_step_memory(model, patch)
    net = build_model(model).train()
    storages: dict[int, int] = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = net(torch.zeros(1, 2, *patch))
    expected = sum(storages.values()) + 4 * 2 * np.prod(patch) + 3 * 4 * logits.numel()
    assert counted.per_sample == expected
    assert counted.fixed == 4 * 4 * sum(p.numel() for p in net.parameters())
    bigger = training_step_memory(model, [32, 48, 32])
    assert 7.5 < bigger.per_sample / counted.per_sample < 8.5  # activations scale with the voxels
