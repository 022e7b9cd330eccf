"""data_manifest.csv, `medseg.data.manifest` and `medseg data`: validation, fetch, verify, list."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
from pathlib import Path

import pytest

from medseg import cli
from medseg.errors import ManifestError
from medseg.data.download import fetch
from medseg.data.manifest import (
    COLUMNS,
    dataset_files,
    dataset_status,
    default_data_root,
    default_manifest_path,
    read_manifest,
)

REPO = Path(__file__).resolve().parents[1]
MIRROR = REPO.parent / "shared" / "data"  # the shared mirror beside the checkout
ISBI = "isbi2012_em"
needs_mirror = pytest.mark.skipif(not (MIRROR / ISBI).is_dir(), reason=f"shared data mirror {MIRROR / ISBI} is absent")


@pytest.fixture(autouse=True)
def _no_env_mirror(monkeypatch: pytest.MonkeyPatch) -> None:
    """A mirror or data dir from the caller's shell must not change what the tests see."""
    monkeypatch.delenv("MEDSEG_DATA_MIRROR", raising=False)
    monkeypatch.delenv("MEDSEG_DATA_DIR", raising=False)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_manifest(path: Path, rows: list[dict[str, str]], columns=COLUMNS) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _row(**values: str) -> dict[str, str]:
    row = {
        "dataset": "tiny",
        "case": "c0",
        "role": "image",
        "path": "a.png",
        "sha256": "0" * 64,
        "split": "train",
        "source_url": "",
        "licence": "test data",
    }
    row.update(values)
    return row


@pytest.fixture
def tiny(tmp_path: Path) -> dict:
    """Two small source files served by file:// URLs, plus a manifest naming them.

    file:// sources are read only from inside a mirror: "url_mirror" holds them at their URLs
    but not in the DIR/<dataset>/<path> layout, so fetching with it takes the URL path.
    """
    src = tmp_path / "src" / "tiny"
    src.mkdir(parents=True)
    files = {"img/0.png": b"image zero", "lab/0.png": b"label zero"}
    rows = []
    for (rel, data), role in zip(files.items(), ("image", "label")):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
        rows.append(_row(role=role, path=rel, sha256=_sha(data), source_url=(src / rel).as_uri()))
    manifest = _write_manifest(tmp_path / "manifest.csv", rows)
    return {
        "manifest": manifest,
        "src": src,
        "rows": rows,
        "files": files,
        "mirror": tmp_path / "src",
        "url_mirror": src,
    }


def _snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, _sha(p.read_bytes()))
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------- the real manifest


def test_real_manifest_validates_with_fixed_split() -> None:
    entries = [e for e in read_manifest() if e.dataset == ISBI]
    assert default_manifest_path() == REPO / "data_manifest.csv"
    assert len(entries) == 90
    train = [e for e in entries if e.case.startswith("train_")]
    test = [e for e in entries if e.case.startswith("test_")]
    assert len(train) == 60 and len(test) == 30
    for e in train:
        n = int(e.case.split("_")[1])
        assert e.path == f"train/{e.role}/{n}.png"
        assert e.split == ("train" if n < 25 else "val")
        assert e.source_url.endswith(f"/data/membrane/{e.path}")
    assert all(e.role == "image" and e.split == "test" for e in test)
    assert {e.path for e in test} == {f"test/{n}.png" for n in range(30)}
    assert all("Cardona" in e.licence for e in entries)


def test_real_manifest_matches_mirror_checksums() -> None:
    sums_file = MIRROR / ISBI / "SHA256SUMS"
    if not sums_file.is_file():
        pytest.skip(f"shared data mirror {MIRROR / ISBI} is absent")
    sums = {}
    for line in sums_file.read_text().splitlines():
        digest, name = line.split(None, 1)
        sums[name.strip().removeprefix("./")] = digest
    assert {e.path: e.sha256 for e in read_manifest() if e.dataset == ISBI} == sums


# --------------------------------------------------------------------------- fetch from the mirror


@needs_mirror
def test_fetch_isbi_from_mirror_verifies_and_leaves_mirror_untouched(tmp_path: Path) -> None:
    before = _snapshot(MIRROR / ISBI)
    report = fetch(ISBI, tmp_path, mirror=MIRROR)
    assert len(report.copied) == 90 and not report.downloaded and not report.verified
    assert report.folder == tmp_path / ISBI
    status = next(s for s in dataset_status(tmp_path) if s.dataset == ISBI)  # the manifest lists others too
    assert (status.expected, status.present, status.verified, status.status) == (90, 90, 90, "verified")

    again = fetch(ISBI, tmp_path, mirror=MIRROR)
    assert not again.copied and not again.downloaded and len(again.verified) == 90
    assert _snapshot(MIRROR / ISBI) == before
    assert not list((tmp_path / ISBI).rglob("*.part"))

    train = dataset_files(ISBI, tmp_path, split="train")
    assert [c.case for c in train] == [f"train_{n}" for n in range(25)]
    assert train[10].image == tmp_path / ISBI / "train/image/10.png"
    assert train[10].label == tmp_path / ISBI / "train/label/10.png"
    val = dataset_files(ISBI, tmp_path, split="val")
    assert [c.case for c in val] == [f"train_{n}" for n in range(25, 30)]
    test = dataset_files(ISBI, tmp_path, split="test")
    assert len(test) == 30 and all(c.label is None for c in test)


def test_dataset_files_missing_says_how_to_fetch(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=rf"medseg data fetch {ISBI} --mirror DIR"):
        dataset_files(ISBI, tmp_path, split="train")


def test_corrupt_local_file_needs_force(tiny: dict, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    fetch("tiny", dest, mirror=tiny["mirror"], manifest=tiny["manifest"])
    target = dest / "tiny" / "img/0.png"
    target.write_bytes(b"edited locally")
    with pytest.raises(ManifestError, match="--force") as err:
        fetch("tiny", dest, mirror=tiny["mirror"], manifest=tiny["manifest"])
    assert str(target) in str(err.value) and _sha(b"edited locally") in str(err.value)
    assert target.read_bytes() == b"edited locally"  # never overwritten without --force
    assert dataset_status(dest, manifest=tiny["manifest"])[0].status == "corrupt"

    report = fetch("tiny", dest, mirror=tiny["mirror"], force=True, manifest=tiny["manifest"])
    assert report.replaced == ["img/0.png"] and report.copied == ["img/0.png"]
    assert target.read_bytes() == tiny["files"]["img/0.png"]


def test_corrupt_mirror_file_is_rejected_and_not_left_behind(tiny: dict, tmp_path: Path) -> None:
    (tiny["src"] / "lab/0.png").write_bytes(b"rotten")
    dest = tmp_path / "dest"
    with pytest.raises(ManifestError, match="checksum mismatch") as err:
        fetch("tiny", dest, mirror=tiny["mirror"], manifest=tiny["manifest"])
    assert _sha(b"rotten") in str(err.value) and tiny["rows"][1]["sha256"] in str(err.value)
    assert sorted(p.name for p in (dest / "tiny").rglob("*") if p.is_file()) == ["0.png"]  # the image only


# --------------------------------------------------------------------------- download (file:// URLs)


def test_download_via_file_urls(tiny: dict, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    report = fetch("tiny", dest, mirror=tiny["url_mirror"], manifest=tiny["manifest"])
    assert sorted(report.downloaded) == sorted(tiny["files"]) and not report.copied
    for rel, data in tiny["files"].items():
        assert (dest / "tiny" / rel).read_bytes() == data
    files = dataset_files("tiny", dest, manifest=tiny["manifest"])
    assert files == [("c0", dest / "tiny/img/0.png", dest / "tiny/lab/0.png")]


def test_download_with_wrong_checksum_leaves_no_file(tiny: dict, tmp_path: Path) -> None:
    rows = [dict(r) for r in tiny["rows"]]
    rows[0]["sha256"] = "ab" * 32
    manifest = _write_manifest(tmp_path / "bad.csv", rows)
    dest = tmp_path / "dest"
    with pytest.raises(ManifestError) as err:
        fetch("tiny", dest, mirror=tiny["url_mirror"], manifest=manifest)
    message = str(err.value)
    assert "ab" * 32 in message and _sha(tiny["files"]["img/0.png"]) in message and "img/0.png" in message
    assert not [p for p in (dest / "tiny").rglob("*") if p.is_file()]


def test_unknown_dataset_lists_known_ones(tiny: dict, tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="known datasets: tiny"):
        fetch("nope", tmp_path, manifest=tiny["manifest"])


def test_default_data_root_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_data_root() == tmp_path / "cache" / "medseg" / "data"
    monkeypatch.setenv("MEDSEG_DATA_DIR", str(tmp_path / "here"))
    assert default_data_root() == tmp_path / "here"


def test_mirror_from_environment(tiny: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDSEG_DATA_MIRROR", str(tiny["mirror"]))
    report = fetch("tiny", tmp_path / "dest", manifest=tiny["manifest"])
    assert len(report.copied) == 2


# --------------------------------------------------------------------------- validation errors


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"path": "../escape.png"}, "'..'"),
        ({"path": "/etc/passwd"}, "absolute"),
        ({"path": "C:/data/a.png"}, "drive letter"),
        ({"path": "img\\a.png"}, "backslash"),
        ({"sha256": "xyz"}, "64 hex"),
        ({"role": "mask"}, "role"),
        ({"split": "holdout"}, "split"),
    ],
)
def test_invalid_row_names_file_and_line(tmp_path: Path, change: dict, expected: str) -> None:
    good = _row(case="c0", path="ok.png")
    manifest = _write_manifest(tmp_path / "m.csv", [good, _row(case="c1", **change)])
    with pytest.raises(ManifestError, match=expected) as err:
        read_manifest(manifest)
    assert f"{manifest}: line 3" in str(err.value)
    if "path" in change:
        assert repr(change["path"]) in str(err.value)


def test_missing_column_is_named(tmp_path: Path) -> None:
    columns = [c for c in COLUMNS if c != "sha256"]
    manifest = _write_manifest(tmp_path / "m.csv", [_row()], columns=columns)
    with pytest.raises(ManifestError, match="missing column") as err:
        read_manifest(manifest)
    assert str(manifest) in str(err.value) and "sha256" in str(err.value)


def test_label_without_image_and_duplicate_path(tmp_path: Path) -> None:
    rows = [_row(case="c0"), _row(case="c1", role="label", path="l.png"), _row(case="c2", path="a.png")]
    manifest = _write_manifest(tmp_path / "m.csv", rows)
    with pytest.raises(ManifestError) as err:
        read_manifest(manifest)
    message = str(err.value)
    assert f"{manifest}: line 3: label 'l.png' has no image with case 'c1'" in message
    assert f"{manifest}: line 4:" in message and "already listed on line 2" in message


def test_missing_manifest_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="--manifest"):
        read_manifest(tmp_path / "absent.csv")


# --------------------------------------------------------------------------- the CLI


@pytest.fixture
def run_cli(monkeypatch: pytest.MonkeyPatch):
    """cli.main with only the command modules that exist yet (others are written in parallel)."""
    present = tuple(m for m in cli.COMMAND_MODULES if importlib.util.find_spec(m) is not None)
    assert "medseg.cli.data" in present
    monkeypatch.setattr(cli, "COMMAND_MODULES", present)
    return cli.main


@needs_mirror
def test_cli_fetch_and_list_real_dataset(run_cli, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_cli(["data", "list", "--dest", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert ISBI in out and "missing" in out and f"medseg data fetch {ISBI}" in out

    assert run_cli(["data", "fetch", ISBI, "--mirror", str(MIRROR), "--dest", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "90 copied" in out and str(tmp_path / ISBI) in out

    assert run_cli(["data", "fetch", ISBI, "--mirror", str(MIRROR), "--dest", str(tmp_path)]) == 0
    assert "0 copied, 0 downloaded, 90 already verified" in capsys.readouterr().out

    assert run_cli(["data", "list", "--dest", str(tmp_path)]) == 0
    line = next(text for text in capsys.readouterr().out.splitlines() if text.startswith(ISBI))
    assert line.split()[:5] == [ISBI, "90", "90", "90", "verified"]
    assert line.split()[5] == str(tmp_path / ISBI)


def test_cli_errors_are_actionable(run_cli, tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = run_cli(["data", "fetch", "nope", "--dest", str(tmp_path), "--manifest", str(tiny["manifest"])])
    assert code == 1
    assert "medseg data: error: unknown dataset 'nope'" in capsys.readouterr().err

    dest = tmp_path / "dest"
    args = [
        "data",
        "fetch",
        "tiny",
        "--dest",
        str(dest),
        "--manifest",
        str(tiny["manifest"]),
        "--mirror",
        str(tiny["url_mirror"]),
    ]
    assert run_cli(args) == 0
    assert "2 downloaded" in capsys.readouterr().out
    (dest / "tiny/img/0.png").write_bytes(b"changed")
    assert run_cli(args) == 1
    assert "--force" in capsys.readouterr().err
    assert run_cli([*args, "--force"]) == 0
    assert "replaced 1 corrupt" in capsys.readouterr().out
