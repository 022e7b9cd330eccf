"""Instance labels: the per-image layout (Kaggle DSB 2018), instance label maps, and the
U-Net paper's separation borders and weight map computed from the true instances."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
from PIL import Image
from scipy import ndimage

from medseg.cli import main
from medseg.config import config_from_dict
from medseg.evaluation.instances import object_counts, separation_scores
from medseg.data.datasets import find_cases, load_case
from medseg.data.nuclei import NucleiImage, nuclei_image, write_instance_case
from medseg.data.targets import label_map, training_target
from medseg.data.weights import border_weight_map, separate_touching, touching_border, touching_pairs
from medseg.errors import ConfigError, LabelError
from medseg.ingest import BudgetError, LoadOptions, discover, load, load_label
from medseg.training.checkpoint import load_checkpoint
from medseg.training.loop import prepare_items

CLASSES = {"background": 0, "nucleus": 1}


def _discs(shape=(40, 30), centres=((13, 15), (26, 15)), radius=7.5) -> np.ndarray:
    """Two discs whose centres are closer than two radii: the shared pixels go to the nearer centre."""
    xs, ys = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    d = np.stack([np.hypot(xs - cx, ys - cy) for cx, cy in centres])
    return np.where(d.min(0) <= radius, d.argmin(0) + 1, 0).astype(np.int32)


def _brute_force_terms(label: np.ndarray, instances: np.ndarray, w0: float, sigma: float):
    """Eq. 2 of the U-Net paper, (w_c, border term), with d1, d2 as minima over every pixel of each instance."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in label.shape], indexing="ij"), -1).reshape(-1, label.ndim)
    per_instance = []
    for i in range(1, int(instances.max()) + 1):
        pixels = np.argwhere(instances == i)
        per_instance.append(np.sqrt(((grid[:, None, :] - pixels[None]) ** 2).sum(-1)).min(1))
    d = np.sort(np.stack(per_instance), axis=0).reshape((-1,) + label.shape)
    counts = np.bincount(label.ravel(), minlength=2).astype(float)
    balance = counts.sum() / (2 * counts)
    balance /= balance.min()
    border = w0 * np.exp(-((d[0] + d[1]) ** 2) / (2 * sigma**2))
    return balance[label], np.where(instances == 0, border, 0.0)


def _brute_force_weights(label: np.ndarray, instances: np.ndarray, w0: float, sigma: float) -> np.ndarray:
    balance, border = _brute_force_terms(label, instances, w0, sigma)
    return balance + border


# --- separation borders and weights -----------------------------------------------------


def test_touching_discs_peak_weight_on_shared_boundary_matches_brute_force():
    discs = _discs()
    assert touching_pairs(discs).tolist() == [[1, 2]]
    separated = separate_touching(discs)
    border = touching_border(discs)
    assert border.sum() > 0 and (separated[border] == 0).all()
    target = (separated > 0).astype(np.int64)
    weights = border_weight_map(target, separated, num_classes=2, w0=10.0, sigma=5.0)
    brute = _brute_force_weights(target, separated, 10.0, 5.0)
    assert np.abs(weights - brute).max() < 1e-4
    # The shared boundary: pixels next to both discs (the contact line and the notches at its ends).
    near = [ndimage.binary_dilation(discs == k, np.ones((3, 3))) for k in (1, 2)]
    shared = near[0] & near[1]
    assert (border <= shared).all()
    peak = np.unravel_index(np.argmax(weights), weights.shape)
    assert shared[peak], f"peak weight at {peak}, not on the shared boundary"
    balance, _ = _brute_force_terms(target, separated, 10.0, 5.0)
    term = weights - balance  # the border term alone: higher on the whole contact line than off the boundary
    assert term[border].min() > term[~shared].max()
    assert term[0, 0] < 0.01  # the image corner is far from both discs


def test_separated_instances_fall_into_different_components():
    nuclei = nuclei_image(shape=(128, 128), nuclei=24, seed=3)
    pairs = touching_pairs(nuclei.instances)
    assert len(pairs) >= 3  # about a third of the nuclei are placed in touching pairs
    separated = separate_touching(nuclei.instances)
    components, _ = ndimage.label(separated > 0, structure=np.ones((3, 3)))  # diagonal neighbours connect too
    for a, b in pairs:
        assert not set(np.unique(components[separated == a])) & set(np.unique(components[separated == b]))
    untouched = np.setdiff1d(np.arange(1, nuclei.instances.max() + 1), pairs.ravel())
    assert all((separated == k).sum() == (nuclei.instances == k).sum() for k in untouched)


def test_weights_need_one_grid_and_non_negative_ids():
    with pytest.raises(ValueError, match="one grid"):
        border_weight_map(np.zeros((4, 4), int), np.zeros((4, 5), int), 2)
    with pytest.raises(ValueError, match="positive"):
        border_weight_map(np.zeros((4, 4), int), -np.ones((4, 4), int), 2)
    single = np.zeros((9, 9), int)
    single[2:5, 2:5] = 1
    assert np.allclose(border_weight_map(single, single, 2), np.where(single, 72 / 9, 1.0))  # no second instance


# --- the per-image layout ----------------------------------------------------------------


def _mask(path: Path, rows: np.ndarray) -> None:
    Image.fromarray(np.where(rows, 255, 0).astype(np.uint8)).save(path)


def _three(seed: int) -> NucleiImage:
    made = nuclei_image(shape=(32, 32), nuclei=3, radius=(3, 4), seed=seed)
    assert made.instances.max() == 3
    return made


@pytest.fixture()
def layout(tmp_path) -> Path:
    """Five DSB-style case folders, each with a quirk, plus files the layout must not swallow."""
    root = tmp_path / "stage1_train"
    a = nuclei_image(shape=(48, 40), nuclei=5, radius=(4, 5), seed=1)
    assert a.instances.max() == 5
    write_instance_case(root, "a", a)  # an RGBA image, masks a-1.png .. a-5.png
    b = root / "b"
    (b / "images").mkdir(parents=True)
    (b / "masks").mkdir()
    Image.fromarray(np.full((20, 30, 4), 200, np.uint8)).save(b / "images" / "b.png")
    left, right = np.zeros((20, 30), bool), np.zeros((20, 30), bool)
    left[5:15, 5:17], right[5:15, 12:25] = True, True  # columns 12..16 are in both masks
    _mask(b / "masks" / "b-1.png", left)
    _mask(b / "masks" / "b-2.png", right)
    c = root / "c"
    write_instance_case(root, "c", _three(seed=2))
    _mask(c / "masks" / "c-99.png", np.ones((16, 32), bool))  # another size than its image
    d = root / "d"
    write_instance_case(root, "d", _three(seed=4))
    (d / "masks" / "d-0.png").write_bytes(b"")  # an empty file
    e = root / "e"
    write_instance_case(root, "e", _three(seed=5))
    _mask(e / "masks" / "e-9.png", np.zeros((32, 32), bool))  # a mask with no pixel set
    (root / "notes.txt").write_text("not a scan")
    return root


def test_layout_is_one_scan_per_case_with_its_masks(layout):
    found = discover(layout)
    assert [s.id for s in found.scans] == ["a", "b", "c", "d", "e"]
    assert all(s.kind == "image" for s in found.scans)  # never an image-sequence of masks
    assert sorted(found.instance_masks) == ["a", "b", "c", "d", "e"]
    a = found.instance_masks["a"]
    assert a.kind == "instance-masks" and [p.name for p in a.paths] == [f"a-{k}.png" for k in range(1, 6)]
    assert [p.reason for p in found.problems] == ["empty file (0 bytes)"]
    assert found.problems[0].paths[0].name == "d-0.png"
    assert len(found.instance_masks["d"].paths) == 3  # the empty file is a problem, not an instance
    assert [p.paths[0].name for p in found.skipped] == ["notes.txt"]
    # Pointed at the case's own masks folder, the masks stay single images, never one stack.
    inside = discover(layout / "a" / "masks")
    assert [s.kind for s in inside.scans] == ["image"] * 5 and not inside.instance_masks


def test_instance_masks_load_with_their_quirks(layout):
    found = discover(layout)
    refs = {s.id: s for s in found.scans}
    a_image = load(refs["a"])
    assert a_image.channels == 1 and "alpha channel dropped" in a_image.notes  # RGBA as DSB ships it
    a = load_label(found.instance_masks["a"], a_image)
    truth = nuclei_image(shape=(48, 40), nuclei=5, radius=(4, 5), seed=1).instances
    assert np.array_equal(a.array[0], truth)  # ids follow the file names' natural order: a-1, a-2, ...
    b = load_label(found.instance_masks["b"], load(refs["b"]))
    assert set(np.unique(b.array[0, 12:17, 5:15])) == {2}  # the later file wins the overlap
    assert any("50 pixel(s) set in more than one instance mask" in n for n in b.notes)
    with pytest.raises(LabelError) as err:
        load_label(found.instance_masks["c"], load(refs["c"]))
    message = str(err.value)
    assert "c-99.png" in message and "32 x 16 pixels but its image is 32 x 32" in message
    assert message.count("\n") == 0 and "Traceback" not in message
    e = load_label(found.instance_masks["e"], load(refs["e"]))
    assert e.array.max() == 3 and any("1 empty instance mask" in n for n in e.notes)


def test_info_lists_cases_with_instance_labels(layout, capsys):
    assert main(["info", str(layout)]) == 1  # the empty mask file is a problem
    text = capsys.readouterr().out
    assert "5 scan(s), 1 problem(s)" in text
    assert "instance labels: 5 mask file(s)" in text and "image-sequence" not in text
    assert "d-0.png: empty file (0 bytes)" in text
    assert main(["info", str(layout / "a"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [s["id"] for s in report["scans"]] == ["a"]
    assert report["scans"][0]["instance_masks"]["files"] == 5


def test_layout_cases_carry_instances_and_refuse_a_second_label_source(layout, tmp_path):
    for case in ("c", "d", "e"):
        shutil.rmtree(layout / case)
    data = {"images": str(layout), "classes": CLASSES}
    config = config_from_dict({"data": data, "model": {"name": "unet"}})
    cases = [c for c in find_cases(config.data) if c.label is not None]
    assert [(c.id, c.instances, c.label.kind) for c in cases] == [
        ("a", True, "instance-masks"),
        ("b", True, "instance-masks"),
    ]
    with pytest.raises(ConfigError, match="holds its own instance masks"):
        find_cases(config_from_dict({"data": {**data, "labels": str(layout)}, "model": {"name": "unet"}}).data)
    table = tmp_path / "cases.csv"
    with open(table, "w", newline="") as fh:
        csv.writer(fh).writerows(
            [["image", "label"], [layout / "a", ""], [layout / "b" / "images" / "b.png", layout / "b" / "masks"]]
        )
    rows = find_cases(
        config_from_dict({"data": {"csv": str(table), "classes": CLASSES}, "model": {"name": "unet"}}).data
    )
    assert [(c.id, c.instances, len(c.label.paths)) for c in rows] == [("a", True, 5), ("b", True, 2)]


def test_training_target_separates_touching_instances(tmp_path):
    discs = _discs()
    write_instance_case(tmp_path, "pair", NucleiImage((0.2 + 0.5 * (discs > 0)).astype(np.float32), discs))
    config = config_from_dict(
        {
            "data": {"images": str(tmp_path), "classes": {"nucleus": 1, "background": 0}},
            "model": {"name": "unet", "features": 4, "depth": 2},
            "train": {"loss": "weighted_ce", "border_class": "nucleus", "patch_size": [32, 32]},
        }
    )
    (case,) = find_cases(config.data)
    scan, label = load_case(case, ids=True)
    ids = label_map(label, True, config.data)
    assert np.array_equal(ids[0], discs)
    assert np.array_equal(load_case(case, classes=[1, 0])[1].array[0], (discs > 0).astype(int))  # class values
    target = training_target(ids[0].astype(np.float32), True, config, with_weights=True)
    border = touching_border(discs)
    # Class indices follow data.classes: nucleus is index 0, background index 1.
    assert (target[0][border] == 1).all() and (target[0][(discs > 0) & ~border] == 0).all()
    separated = separate_touching(discs)
    brute = _brute_force_weights((separated > 0).astype(np.int64), separated, 10.0, 5.0)
    assert np.abs(target[1] - brute).max() < 1e-4  # class balance is per class, whatever its index
    (item,) = prepare_items([case], config, with_weights=True)
    assert np.array_equal(item.target.numpy(), target)


def test_instance_label_maps_are_declared_in_the_config(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir(), labels.mkdir()
    discs = _discs()
    ids = np.where(discs == 1, 1000, np.where(discs == 2, 40000, 0)).astype(np.uint16)  # sparse 16-bit ids
    tifffile.imwrite(images / "x.tif", np.full(discs.T.shape, 100, np.uint8))
    tifffile.imwrite(labels / "x.tif", ids.T)
    Image.fromarray(ids.T).save(labels / "y.png")  # a 16-bit PNG: the same map
    tifffile.imwrite(images / "y.tif", np.full(discs.T.shape, 100, np.uint8))
    data = {"images": str(images), "labels": str(labels), "classes": CLASSES, "labels_are": "instances"}
    config = config_from_dict({"data": data, "model": {"name": "unet"}})
    for case in find_cases(config.data):
        assert case.instances
        dense = label_map(load_case(case, ids=True)[1], True, config.data)
        assert np.array_equal(dense[0], discs)  # 1000 and 40000 renumbered 1 and 2, in order
    as_classes = config_from_dict({"data": {**data, "labels_are": "classes"}, "model": {"name": "unet"}})
    case = find_cases(as_classes.data)[0]
    with pytest.raises(LabelError, match=r"label values \[1000, 40000\] are not among the configured classes"):
        load_case(case, classes=list(CLASSES.values()))
    with pytest.raises(ConfigError, match="must name two classes, background with value 0"):
        config_from_dict({"data": {**data, "classes": {"a": 0, "b": 1, "c": 2}}, "model": {"name": "unet"}})


def test_medseg_train_on_the_layout_end_to_end(tmp_path, capsys):
    root = tmp_path / "nuclei"
    for i in range(3):
        write_instance_case(root, f"case{i}", nuclei_image(shape=(48, 48), nuclei=6, radius=(4, 6), seed=10 + i))
    config = {
        "name": "nuclei",
        "data": {
            "images": str(root),
            "classes": CLASSES,
            "split": {"mode": "cases", "train": ["case0", "case1"], "val": ["case2"]},
        },
        "model": {"name": "unet", "spatial_dims": 2, "features": 4, "depth": 2},
        "augment": {"enabled": False},
        "train": {
            "epochs": 1,
            "steps_per_epoch": 2,
            "batch_size": 2,
            "patch_size": [32, 32],
            "loss": "weighted_ce",
            "border_class": "nucleus",
            "device": "cpu",
        },
        "infer": {"sw_batch_size": 4},
        "output_dir": str(tmp_path / "runs"),
    }
    path = tmp_path / "nuclei.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(path)]) == 0
    state = load_checkpoint(tmp_path / "runs" / "nuclei" / "best.pt")
    assert state.training.epoch == 1 and "dice_nucleus" in state.training.history[0]
    assert json.loads((tmp_path / "runs" / "nuclei" / "split.json").read_text())["val"] == ["case2"]
    assert "Trained unet for 1 epoch(s)" in capsys.readouterr().out


def test_instance_masks_loaded_with_a_budget(layout):
    ref = discover(layout).instance_masks["a"]
    scan = load(ref, LoadOptions(memory_budget_mb=1))  # the registry reads instance masks too
    assert scan.array.shape == (1, 48, 40) and scan.array.max() == 5
    with pytest.raises(BudgetError):
        load(ref, LoadOptions(memory_budget_mb=1e-4))


def test_object_scores_count_separated_pairs_and_matched_objects():
    discs = _discs()
    union, separated = discs > 0, separate_touching(discs) > 0
    assert separation_scores(discs, union) == {"pairs": 1, "separated": 0, "pair_missed": 0}
    assert separation_scores(discs, separated) == {"pairs": 1, "separated": 1, "pair_missed": 0}
    assert separation_scores(discs, discs == 1) == {"pairs": 1, "separated": 0, "pair_missed": 1}
    assert object_counts(discs, separated) == {"true_objects": 2, "predicted_objects": 2, "matched": 2}
    assert object_counts(discs, union) == {"true_objects": 2, "predicted_objects": 1, "matched": 0}
