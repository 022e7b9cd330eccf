"""Parts of training: case sources and splits, preprocessing and its inverse, weight maps, patches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from medseg.data import phantoms
from medseg.config import DataConfig, SplitConfig, config_from_dict
from medseg.data.datasets import find_cases, split_cases
from medseg.errors import ConfigError
from medseg.geometry import Geometry
from medseg.ingest import Scan, ScanRef
from medseg.data.sampling import Item, PatchSampler
from medseg.data.transforms import Preprocessor, index_to_label, label_to_index
from medseg.data.weights import border_weight_map, instances_of_class


def test_nnunet_layout_with_channel_suffixes(tmp_path):
    ct = phantoms.ct_phantom(shape=(12, 10, 6))
    for case in ("a", "b"):
        for ch in (0, 1):
            phantoms.write_nifti(ct.image, ct.affine, tmp_path / "imagesTr" / f"{case}_{ch:04d}.nii.gz")
        phantoms.write_nifti(ct.label, ct.affine, tmp_path / "labelsTr" / f"{case}.nii.gz")
    cases = find_cases(DataConfig(images=tmp_path / "imagesTr", labels=tmp_path / "labelsTr"))
    assert [c.id for c in cases] == ["a", "b"]
    assert [len(c.images) for c in cases] == [2, 2]
    assert cases[0].images[1].paths[0].name == "a_0001.nii.gz"
    assert cases[0].label.paths[0].name == "a.nii.gz"


def test_folder_label_without_image_is_an_error(tmp_path):
    ct = phantoms.ct_phantom(shape=(8, 8, 4))
    phantoms.write_nifti(ct.image, ct.affine, tmp_path / "im" / "x.nii.gz")
    phantoms.write_nifti(ct.label, ct.affine, tmp_path / "lb" / "y.nii.gz")
    with pytest.raises(ConfigError, match="no image with the same case name"):
        find_cases(DataConfig(images=tmp_path / "im", labels=tmp_path / "lb"))


def test_csv_source_with_relative_paths(tmp_path):
    em = phantoms.em_phantom(shape=(16, 16, 2))
    phantoms.write_png_sequence(em.image, tmp_path / "img")
    phantoms.write_png_sequence(em.label, tmp_path / "lab")
    (tmp_path / "cases.csv").write_text("image,label\nimg/0.png,lab/0.png\nimg/1.png,\n")
    cases = find_cases(DataConfig(csv=tmp_path / "cases.csv"))
    assert [c.label is not None for c in cases] == [True, False]
    (tmp_path / "bad.csv").write_text("image,label\nimg/9.png,lab/0.png\n")
    with pytest.raises(ConfigError, match="line 2: image .* does not exist"):
        find_cases(DataConfig(csv=tmp_path / "bad.csv"))


def test_splits_fraction_kfold_cases(tmp_path):
    em = phantoms.em_phantom(shape=(16, 16, 10))
    phantoms.write_png_sequence(em.image, tmp_path / "i")
    phantoms.write_png_sequence(em.label, tmp_path / "l")
    cases = find_cases(DataConfig(images=tmp_path / "i", labels=tmp_path / "l"))
    train, val = split_cases(cases, SplitConfig(mode="fraction", val_fraction=0.3, seed=1))
    assert len(val) == 3 and len(train) == 7 and not {c.id for c in train} & {c.id for c in val}
    assert [c.id for c in split_cases(cases, SplitConfig(mode="fraction", val_fraction=0.3, seed=1))[1]] == [
        c.id for c in val
    ]
    folds = [split_cases(cases, SplitConfig(mode="kfold", folds=5, fold=f))[1] for f in range(5)]
    assert sorted(c.id for fold in folds for c in fold) == sorted(c.id for c in cases)
    train, val = split_cases(cases, SplitConfig(mode="cases", train=["0", "1"], val=["9"]))
    assert [c.id for c in train] == ["0", "1"] and [c.id for c in val] == ["9"]
    with pytest.raises(ConfigError, match="unknown or unlabelled case ids"):
        split_cases(cases, SplitConfig(mode="cases", train=["nope"]))


def test_isbi_manifest_split(tmp_path):
    from conftest import SHARED_DATA
    from medseg.data import download

    if not (SHARED_DATA / "isbi2012_em").is_dir():
        pytest.skip("shared ISBI data not present")
    download.fetch("isbi2012_em", dest=tmp_path, mirror=SHARED_DATA)
    cases = find_cases(DataConfig(dataset="isbi2012_em", root=tmp_path, classes={"membrane": 0, "cell": 255}))
    train, val = split_cases(cases, SplitConfig(mode="manifest"))
    assert [c.id for c in train] == [f"train_{i}" for i in range(25)]
    assert [c.id for c in val] == [f"train_{i}" for i in range(25, 30)]


def test_mixed_dtypes_and_float_labels_just_work(tmp_path):
    """uint8 next to float32 images, a label stored as float: training items come out alike."""
    from medseg.training.loop import prepare_items

    a = phantoms.ct_phantom(shape=(16, 16, 8), seed=1)
    phantoms.write_nifti(a.image.astype(np.float32), a.affine, tmp_path / "im" / "a.nii.gz")
    phantoms.write_nifti(np.clip(a.image, 0, 255).astype(np.uint8), a.affine, tmp_path / "im" / "b.nii.gz")
    phantoms.write_nifti(a.label.astype(np.float32), a.affine, tmp_path / "lb" / "a.nii.gz")
    phantoms.write_nifti(a.label, a.affine, tmp_path / "lb" / "b.nii.gz")
    config = config_from_dict(
        {
            "data": {
                "images": str(tmp_path / "im"),
                "labels": str(tmp_path / "lb"),
                "classes": {"background": 0, "liver": 1, "kidney": 2, "spine": 3},
            },
            "model": {"name": "unet", "spatial_dims": 3, "out_channels": 4, "depth": 3},  # sizes divisible by 4
            "train": {"patch_size": [16, 16, 8]},
        }
    )
    items = prepare_items(find_cases(config.data), config, with_weights=False)
    assert [i.image.dtype for i in items] == [torch.float32, torch.float32]
    assert all(abs(float(i.image.mean())) < 1e-4 for i in items)  # z-scored per case
    assert torch.equal(items[0].target, items[1].target)


def test_preprocess_resample_and_invert_back_to_scan_grid():
    ct = phantoms.ct_phantom(shape=(30, 28, 16), oblique=(10, 20, 30))
    scan = Scan(ScanRef("x", "nifti", (Path("x"),)), ct.image[None], Geometry(ct.affine, ct.image.shape), "CT")
    pre = Preprocessor({"intensity": "ct_window", "orientation": "LPS", "spacing": [1.2, 1.2, 2.0]})
    out = pre(scan, ct.label[None])
    assert out["image"].min() >= 0 and out["image"].max() <= 1
    assert tuple(out["image"].shape[1:]) != ct.image.shape
    back = Preprocessor.invert(out["label"], out)
    assert back.shape == (1,) + ct.image.shape
    assert (back[0] == ct.label).mean() > 0.97  # nearest resampling there and back


def test_dataset_zscore_clips_and_normalises_each_channel_with_the_dataset_statistics():
    """nnU-Net's CT scheme: clip to the foreground percentiles, then one global z-score per channel;
    the geometric record survives, so the prediction still inverts onto the scan's grid."""
    ct = phantoms.ct_phantom(shape=(30, 28, 16), oblique=(10, 20, 30))
    two = np.stack([ct.image, ct.image // 2]).astype(np.float32)
    scan = Scan(ScanRef("x", "nifti", (Path("x"),)), two, Geometry(ct.affine, ct.image.shape), "CT")
    stats = [
        {"low": -100.0, "high": 200.0, "mean": 50.0, "std": 25.0},
        {"low": 0.0, "high": 50.0, "mean": 10.0, "std": 5.0},
    ]
    pre = Preprocessor({"intensity": "dataset_zscore", "channel_stats": stats, "spacing": [1.2, 1.2, 2.0]})
    out = pre(scan, ct.label[None])
    image = np.asarray(out["image"])
    for channel, s in enumerate(stats):
        assert image[channel].min() == pytest.approx((s["low"] - s["mean"]) / s["std"])
        assert image[channel].max() == pytest.approx((s["high"] - s["mean"]) / s["std"])
    flat = Preprocessor({"intensity": "dataset_zscore", "channel_stats": stats})(scan)  # no resampling: exact values
    expected = (np.clip(two[1], 0, 50) - 10) / 5
    assert np.allclose(np.asarray(flat["image"])[1], expected, atol=1e-5)
    back = Preprocessor.invert(out["label"], out)
    assert (back[0] == ct.label).mean() > 0.97
    with pytest.raises(ConfigError, match="dataset_zscore needs channel_stats"):
        config_from_dict(
            {
                "model": {"name": "unet", "spatial_dims": 3},
                "train": {"patch_size": [16, 16, 16]},
                "preprocess": {"intensity": "dataset_zscore"},
            }
        )
    with pytest.raises(ConfigError, match="channel_stats has 2 entries but model.in_channels is 1"):
        config_from_dict(
            {
                "model": {"name": "unet", "spatial_dims": 3},
                "train": {"patch_size": [16, 16, 16]},
                "preprocess": {"intensity": "dataset_zscore", "channel_stats": stats},
            }
        )
    with pytest.raises(ConfigError, match="low < high"):
        config_from_dict(
            {
                "model": {"name": "unet", "spatial_dims": 3},
                "train": {"patch_size": [16, 16, 16]},
                "preprocess": {
                    "intensity": "dataset_zscore",
                    "channel_stats": [{"low": 5, "high": 1, "mean": 0, "std": 1}],
                },
            }
        )


def test_label_values_map_to_indices_and_back():
    label = np.array([[0, 255], [255, 0]])
    index = label_to_index(label, [255, 0])
    assert index.tolist() == [[1, 0], [0, 1]]
    assert index_to_label(index, [255, 0]).tolist() == label.tolist()
    with pytest.raises(Exception, match=r"\[7\]"):
        label_to_index(np.array([7]), [0, 255])


def test_border_weight_map_matches_brute_force():
    em = phantoms.em_phantom(shape=(80, 64, 1), cells=10, seed=2)
    index = (em.label[..., 0] == 255).astype(np.int64)
    instances, n = ndimage.label(index == 1)
    fast = border_weight_map(index, instances_of_class(index, 1), num_classes=2, w0=10, sigma=5)
    d = np.sort(np.stack([ndimage.distance_transform_edt(instances != i) for i in range(1, n + 1)]), axis=0)
    counts = np.bincount(index.ravel(), minlength=2)
    balance = counts.sum() / (2 * counts)
    balance /= balance.min()
    brute = balance[index] + np.where(instances == 0, 10 * np.exp(-((d[0] + d[1]) ** 2) / 50), 0)
    assert np.abs(fast - brute).max() < 1e-4
    assert fast.max() > 5  # narrow gaps between cells weigh far more than the rest


def test_foreground_oversampling_finds_rare_class():
    label = torch.zeros(1, 64, 64)
    label[0, 60, 60] = 1  # one rare voxel
    item = Item("x", torch.zeros(1, 64, 64), label)
    gen = torch.Generator().manual_seed(0)
    hits = sum(int(PatchSampler([item], (16, 16), 1.0, gen).sample(1)[1].sum() > 0) for _ in range(20))
    assert hits == 20
    gen = torch.Generator().manual_seed(0)
    hits = sum(int(PatchSampler([item], (16, 16), 0.0, gen).sample(1)[1].sum() > 0) for _ in range(50))
    assert hits < 20
    small = Item("s", torch.ones(1, 8, 8), torch.zeros(1, 8, 8))
    images, _ = PatchSampler([small], (16, 16), 0.0, torch.Generator()).sample(2)
    assert images.shape == (2, 1, 16, 16)
