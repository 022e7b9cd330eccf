"""msd_hippocampus_dev in data_manifest.csv: every file checksummed, a fixed 5-fold split that kfold uses."""

from __future__ import annotations

import pytest

from conftest import SHARED_DATA
from medseg.data import download, manifest
from medseg.config import config_from_dict
from medseg.data.datasets import find_cases, split_cases
from medseg.errors import ConfigError, ManifestError

DATASET = "msd_hippocampus_dev"
needs_data = pytest.mark.skipif(not (SHARED_DATA / DATASET).is_dir(), reason=f"needs ../shared/data/{DATASET}")


def test_the_manifest_lists_60_cases_in_five_fixed_folds_of_twelve():
    rows = [e for e in manifest.read_manifest() if e.dataset == DATASET]
    assert len(rows) == 120 and {e.role for e in rows} == {"image", "label"}
    folds = {e.case: e.fold for e in rows if e.role == "image"}
    assert all(e.fold == folds[e.case] for e in rows)  # image and label of a case share its fold
    assert sorted(list(folds.values()).count(f) for f in range(5)) == [12] * 5
    assert all(e.size and e.source_url.startswith("https://") and "CC-BY-SA" in e.licence for e in rows)


@needs_data
def test_every_file_verifies_against_the_shared_copy(tmp_path):
    report = download.fetch(DATASET, dest=tmp_path, mirror=SHARED_DATA)
    assert len(report.copied) == 120  # each copied from the mirror and its sha256 checked
    status = next(s for s in manifest.dataset_status(dest=tmp_path) if s.dataset == DATASET)
    assert (status.expected, status.verified, status.missing, status.corrupt) == (120, 120, [], [])


def _config(fold: int, folds: int = 5):
    return config_from_dict(
        {
            "data": {
                "dataset": DATASET,
                "root": str(SHARED_DATA),
                "classes": {"background": 0, "anterior": 1, "posterior": 2},
                "split": {"mode": "kfold", "folds": folds, "fold": fold},
            },
            "model": {"name": "unet", "spatial_dims": 3, "out_channels": 3, "depth": 3},
            "train": {"patch_size": [32, 48, 32]},
        }
    )


@needs_data
def test_kfold_uses_the_manifests_folds():
    cases = find_cases(_config(0).data)
    seen = []
    for fold in range(5):
        config = _config(fold)
        train, val = split_cases(cases, config.data.split)
        assert len(val) == 12 and len(train) == 48 and not {c.id for c in train} & {c.id for c in val}
        assert all(c.fold == fold for c in val)
        seen += [c.id for c in val]
    assert sorted(seen) == sorted(c.id for c in cases)  # every case validates exactly once
    with pytest.raises(ConfigError, match=r"data.split.folds: 4, but the manifest fixes folds \[0, 1, 2, 3, 4\]"):
        split_cases(cases, _config(0, folds=4).data.split)


def test_a_bad_fold_value_is_a_manifest_error(tmp_path):
    text = (
        manifest.default_manifest_path().read_text().splitlines()[0] + "\n"
        "x,c1,image,a.nii.gz," + "0" * 64 + ",train,https://example.org/a,CC0,10,five\n"
    )
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(ManifestError, match="fold 'five' must be a fold number"):
        manifest.read_manifest(tmp_path / "m.csv")
