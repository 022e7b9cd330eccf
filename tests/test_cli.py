"""The command line: help, version, `medseg info`, `medseg demo`."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest

from medseg import __version__
from medseg.data import phantoms
from medseg.cli import main

INFO_KEYS = {
    "id",
    "kind",
    "path",
    "files",
    "modality",
    "series_description",
    "channels",
    "dtype",
    "intensity_range",
    "shape",
    "spacing",
    "spacing_known",
    "origin",
    "orientation",
    "affine",
    "notes",
    "problems",
}


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("info", "data", "config", "demo"):
        assert command in out


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert __version__ in capsys.readouterr().out


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "medseg", "--version"], capture_output=True, text=True, check=True)
    assert __version__ in result.stdout


def test_info_json_on_oblique_series(tmp_path, capsys, oblique_ct):
    phantoms.write_dicom_series(oblique_ct, tmp_path / "ct", order="reversed")
    assert main(["info", str(tmp_path / "ct"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"root", "scans", "problems", "skipped"}
    (scan,) = report["scans"]
    assert set(scan) == INFO_KEYS
    assert scan["kind"] == "dicom" and scan["files"] == oblique_ct.image.shape[2]
    assert np.allclose(scan["affine"], oblique_ct.affine, atol=1e-4)
    assert scan["modality"] == "CT" and scan["series_description"] == "phantom CT"


def test_info_text_lists_problems_and_exits_nonzero(tmp_path, capsys, ct):
    paths = phantoms.write_dicom_series(ct, tmp_path / "ct")
    paths[3].unlink()
    (tmp_path / "zero.dcm").write_bytes(b"")
    assert main(["info", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "non-uniform slice spacing" in out and "empty file" in out


def test_info_on_missing_path(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nothing")]) == 1
    assert "does not exist" in capsys.readouterr().err


HEAVY = ("torch", "monai", "numpy", "nibabel", "pydicom", "prefect", "scipy", "skimage")


def test_parser_imports_no_heavy_library():
    """`medseg --help` answers at once: building the parser imports none of the heavy libraries (a fresh
    process, so modules this test run already imported cannot hide one)."""
    code = (
        "import medseg.cli, sys; medseg.cli.build_parser(); "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def _command_paths() -> list[tuple[str, ...]]:
    """Every command, and every action of a command that has actions (`data fetch`), as argv prefixes."""
    from medseg.cli import build_parser

    def subcommands(parser) -> dict:
        return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})

    paths = []
    for name, command in subcommands(build_parser()).items():
        paths.append((name,))
        paths += [(name, action) for action in subcommands(command)]
    return paths


def test_command_paths_cover_every_command():
    names = {path[0] for path in _command_paths()}
    commands = {"info", "data", "config", "plan", "train", "predict", "evaluate", "demo", "serve", "status", "view"}
    assert names == commands
    assert ("data", "fetch") in _command_paths()


@pytest.mark.parametrize("path", _command_paths(), ids=" ".join)
def test_every_command_help_works(path):
    result = subprocess.run([sys.executable, "-m", "medseg", *path, "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"usage: medseg {' '.join(path)}" in result.stdout
    assert result.stderr == ""


def test_version_in_fresh_process_names_the_command():
    result = subprocess.run([sys.executable, "-m", "medseg", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == f"medseg {__version__}"
