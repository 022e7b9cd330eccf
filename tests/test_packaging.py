"""medseg installed from a wheel, away from the repository, finds its shipped configs and page assets, and its
Prefect code (the top-level flows/ folder) installs as medseg_flows, never as a bare ``flows``.

Why: an editable checkout hides packaging mistakes (a path built from ``__file__`` into the
repository works there and nowhere else). The wheel is built from this tree and installed
into a throw-away folder; the checks run in a fresh interpreter whose working directory and
import path hold no checkout.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from medseg.config import load_config, packaged_config
from medseg.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_every_shipped_config_is_found_through_the_package_and_loads() -> None:
    for path in sorted((REPO / "configs").glob("*.yaml")):
        found = packaged_config(path.name)
        assert found.read_bytes() == path.read_bytes()
        if path.name != "nightly.yaml":  # the nightly config is read by the flow's own settings model
            load_config(found)
    with pytest.raises(ConfigError, match="ships no config named nope.yaml; shipped: .*nightly.yaml"):
        packaged_config("nope.yaml")
    with pytest.raises(ConfigError, match="not the name of a shipped config"):
        packaged_config("../pyproject.toml")


def _listed_packages() -> dict[Path, str]:
    """The folder each package listed in pyproject.toml ships from, through its package-dir mapping."""
    import tomllib

    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = setuptools["package-dir"]

    def folder(name: str) -> Path:
        prefix = max((p for p in mapped if name == p or name.startswith(p + ".")), key=len, default="")
        rest = name[len(prefix) :].lstrip(".").split(".") if prefix else name.split(".")
        return REPO.joinpath(mapped.get(prefix, ""), *filter(None, rest))

    return {folder(name): name for name in setuptools["packages"]}


def test_package_list_names_every_package_folder() -> None:
    """pyproject lists the packages (configs/ and flows/ are mapped in), so a new folder must be listed to ship."""
    listed = _listed_packages()
    assert all((folder / "__init__.py").is_file() for folder in listed), listed
    folders = {p.parent for root in ("medseg", "flows") for p in (REPO / root).rglob("__init__.py")}
    assert folders - set(listed) == set(), "add these to [tool.setuptools] packages in pyproject.toml"


def test_the_prefect_code_installs_as_medseg_flows_not_flows() -> None:
    """A bare top-level `flows` would collide with any other distribution's `flows` in the same environment."""
    listed = _listed_packages()
    assert listed[REPO / "flows"] == "medseg_flows" and "flows" not in listed.values()
    assert listed[REPO / "configs"] == "medseg.configs"


@pytest.mark.slow
def test_a_wheel_installed_elsewhere_finds_configs_assets_and_medseg_flows(tmp_path: Path) -> None:
    wheels, target, elsewhere, source = tmp_path / "wheels", tmp_path / "site", tmp_path / "cwd", tmp_path / "src"
    elsewhere.mkdir()
    # Built from a copy of the sources alone: setuptools reuses the checkout's build/ folder, whose stale
    # packages (a renamed or deleted one) would otherwise ship in the wheel and hide or fake a packaging mistake.
    for folder in ("medseg", "flows", "configs"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(
        [*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels)],
        check=True,
        capture_output=True,
    )
    wheel = next(wheels.glob("medseg-*.whl"))
    with zipfile.ZipFile(wheel) as archive:  # the Prefect code ships as medseg_flows, never as a bare flows
        top_level = {name.split("/")[0] for name in archive.namelist() if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"medseg", "medseg_flows"}, top_level
    subprocess.run([*pip, "install", "--no-deps", "-q", "--target", str(target), str(wheel)], check=True)
    probe = (
        "import medseg, sys; from medseg.config import packaged_config; "
        "from importlib import resources; "
        "p = packaged_config('nightly.yaml'); "
        "assert str(p).startswith(sys.argv[1]), p; "
        "assert resources.files('medseg.review').joinpath('assets', 'review.js').is_file(); "
        "assert p.with_name('msd_hippocampus_dev.fingerprint.json').is_file(); "
        "import medseg_flows.segment_study as s; from importlib.machinery import PathFinder; "
        "assert s.__file__.startswith(sys.argv[1]) and s.segment_study.name == 'segment-study', s.__file__; "
        "assert PathFinder.find_spec('flows', [sys.argv[1]]) is None; "
        "print(p)"
    )
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "PREFECT_HOME": str(tmp_path / "prefect")}
    done = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {probe}", str(target)],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("nightly.yaml")


def test_serve_init_writes_the_shipped_nightly_config_and_serve_says_how_to_get_one(tmp_path, monkeypatch, capsys):
    """In an empty folder (an installed medseg has no repository beside it) `serve` points at `serve --init`."""
    from medseg.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["serve"]) != 0
    assert "configs/nightly.yaml: no nightly config there; `medseg serve --init` writes" in capsys.readouterr().err
    assert main(["serve", "--init"]) == 0
    written = tmp_path / "configs" / "nightly.yaml"
    assert written.read_bytes() == packaged_config("nightly.yaml").read_bytes()
    assert "set parameters.input_dir, output_dir and checkpoint" in capsys.readouterr().out
    written.write_text(written.read_text() + "# my edits\n")
    assert main(["serve", "--init"]) != 0  # never replaces an edited file
    assert "already exists" in capsys.readouterr().err and written.read_text().endswith("# my edits\n")
    assert main(["serve", "--init", "--config", "elsewhere/n.yaml"]) == 0
    assert (tmp_path / "elsewhere" / "n.yaml").is_file()
