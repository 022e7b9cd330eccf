"""Configs cannot hurt: hostile YAML and out-of-range values are refused at load time.

Each refusal is a ConfigError that names the file and the dotted key, raised before an
alias bomb expands, before deep nesting reaches Python's recursion limit, and before a
zero patch size, a billion-sample batch or a ``../`` run name reaches training.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from medseg.cli import main
from medseg.config import (
    MAX_CONFIG_BYTES,
    MAX_YAML_ALIASES,
    MAX_YAML_DEPTH,
    YamlLimitError,
    load_config,
    load_yaml,
)
from medseg.errors import ConfigError

UNET = "model: {name: unet}\n"


def billion_laughs(under: str = "options") -> str:
    """Nine levels of nine aliases each under ``model.<under>``: 30 lines that expand to 4.9e8 values."""
    lines = [
        "model:",
        "  name: unet",
        f"  {under}:",
        '    a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]',
    ]
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"    {name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    return "\n".join(lines) + "\n"


def alias_chain(levels: int) -> str:
    """Each anchor wraps the previous one in a list: only `levels` lines, but nested `levels` deep once expanded."""
    lines = ["model:", "  name: unet", "  options:", "    l0: &l0 [1]"]
    lines += [f"    l{i}: &l{i} [*l{i - 1}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


HOSTILE = {
    # YAML structure: refused while composing, before any value is built
    "alias_bomb": (billion_laughs(), "model.options", "alias bomb"),
    "deep_nesting": (
        UNET.rstrip("}\n") + ", options: {x: " + "[" * 5000 + "]" * 5000 + "}}\n",
        "model.options.x",
        f"more than {MAX_YAML_DEPTH} levels deep",
    ),
    "alias_chain_depth": (alias_chain(60), "model.options", "levels deep"),
    "recursive_alias": ("model: {name: unet, options: {loop: &a [1, *a]}}\n", "model.options.loop", "recursive alias"),
    "too_many_aliases": (
        "model: {name: unet, options: {x: &x 1, many: [" + ", ".join(["*x"] * (MAX_YAML_ALIASES + 1)) + "]}}\n",
        "model.options.many",
        f"more than {MAX_YAML_ALIASES} aliases",
    ),
    "huge_integer": (UNET + "train: {epochs: " + "9" * 5000 + "}\n", "train.epochs", "an integer of 5000 characters"),
    # sizes
    "zero_patch": (
        "model: {name: unet, spatial_dims: 3}\ntrain: {patch_size: [0, 0, 0]}\n",
        "train.patch_size",
        "every size must be 1 to",
    ),
    "zero_roi": (UNET + "infer: {roi_size: [0, 0]}\n", "infer.roi_size", "every size must be 1 to"),
    "roi_wrong_length": (UNET + "infer: {roi_size: [64, 64, 64]}\n", "infer.roi_size", "model.spatial_dims=2 values"),
    "patch_not_a_multiple": (UNET + "train: {patch_size: [250, 256]}\n", "train.patch_size", "multiple of 16 for unet"),
    "roi_not_a_multiple_segnet": (
        "model: {name: segnet}\ninfer: {roi_size: [48, 64]}\n",
        "infer.roi_size",
        "multiple of 32 for segnet",
    ),
    "valid_unet_bad_patch": (
        "model: {name: unet, options: {padding: valid}}\ntrain: {patch_size: [570, 572]}\n",
        "train.patch_size",
        "nearest valid: 556 or 572",
    ),
    "patch_too_many_voxels": (
        "model: {name: unet, spatial_dims: 3}\ntrain: {patch_size: [4096, 4096, 4096]}\n",
        "train.patch_size",
        "more than 16777216",
    ),
    "batch_1e9": (UNET + "train: {batch_size: 1e9}\n", "train.batch_size", "less than or equal to 4096"),
    "batch_voxels": (
        UNET + "train: {batch_size: 4096, patch_size: [512, 512]}\n",
        "train.batch_size",
        "voxels a batch",
    ),
    "sw_batch": (UNET + "infer: {sw_batch_size: 1000000}\n", "infer.sw_batch_size", "less than or equal to 1024"),
    # the model
    "features": ("model: {name: unet, features: 100000}\n", "model.features", "less than or equal to 1024"),
    "depth": ("model: {name: unet, depth: 30}\n", "model.depth", "less than or equal to 8"),
    "too_many_parameters": ("model: {name: fcn8s, options: {fc_features: 1000000}}\n", "model: fcn8s", "parameters"),
    "unknown_model": ("model: {name: unett}\n", "model.name", "available models"),
    "unknown_option": (
        "model: {name: unet, options: {batchnorm: true}}\n",
        "model.options.batchnorm",
        "accepted options: batch_norm",
    ),
    # loop lengths and other numbers
    "epochs": (UNET + "train: {epochs: 1000000000}\n", "train.epochs", "less than or equal to 100000"),
    "steps": (UNET + "train: {steps_per_epoch: 1e12}\n", "train.steps_per_epoch", "less than or equal to 100000"),
    "infinite_lr": (UNET + "train: {learning_rate: .inf}\n", "train.learning_rate", "finite number"),
    "nan_overlap": (UNET + "infer: {overlap: .nan}\n", "infer.overlap", "finite number"),
    "overlap": (UNET + "infer: {overlap: 0.999}\n", "infer.overlap", "less than or equal to 0.9"),
    "seed": (UNET + "train: {seed: 1099511627776}\n", "train.seed", "less than or equal to 4294967295"),
    "grid_size": (UNET + "augment: {grid_size: 1000000}\n", "augment.grid_size", "less than or equal to 64"),
    "percentiles": (UNET + "preprocess: {percentiles: [99, 1]}\n", "preprocess.percentiles", "0 <= low < high <= 100"),
    "spacing": (UNET + "preprocess: {spacing: [0, 1, 1]}\n", "preprocess.spacing", "three positive voxel sizes"),
    "label_value": (UNET + "data: {classes: {bg: 0, fg: 1099511627776}}\n", "data.classes", "32-bit label image"),
    # names and paths
    "name_parent": (UNET + "name: ../../x\n", "name", "not a plain name"),
    "name_absolute": (UNET + "name: /etc/cron.d\n", "name", "not a plain name"),
    "name_hidden": (UNET + "name: .hidden\n", "name", "not a plain name"),
    "name_control": (UNET + 'name: "run\\tone"\n', "name", "not a plain name"),
    "name_long": (UNET + "name: " + "a" * 65 + "\n", "name", "not a plain name"),
    "output_dir_nul": (UNET + 'output_dir: "runs\\0/x"\n', "output_dir", "control character"),
}


@pytest.mark.parametrize("text, key, problem", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_config_is_refused_naming_file_and_key(tmp_path, text, key, problem):
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert f"{path}: {key}" in message, message
    assert problem in message, message
    assert len(message) < 2000  # a hostile value is not echoed whole


@pytest.mark.parametrize(
    "override, key, problem",
    [
        ("train.batch_size=1e9", "train.batch_size", "less than or equal to 4096"),
        ("model.options.x=" + "[" * 100 + "]" * 100, "model.options.x", "levels deep"),
        ("name=../up", "name", "not a plain name"),
        (".".join(["train"] + ["k"] * 40) + "=1", "train.k.k.k", "41 levels of keys"),
    ],
    ids=["batch", "nesting", "name", "key_depth"],
)
def test_hostile_override_is_refused_naming_the_key(tmp_path, override, key, problem):
    path = tmp_path / "exp.yaml"
    path.write_text(UNET)
    with pytest.raises(ConfigError) as info:
        load_config(path, [override])
    message = str(info.value)
    assert str(path) in message and key in message and problem in message, message


def _nightly(path):
    from medseg_flows.settings import load_nightly_config

    return load_nightly_config(path)


@pytest.mark.parametrize("loader", [load_config, _nightly], ids=["experiment", "nightly"])
def test_alias_bomb_is_refused_before_it_expands(tmp_path, loader):
    """Before: `medseg config` on this file grew to 3.8 GB. Now loading allocates well under a megabyte.
    `medseg serve --config` reads the nightly config through the same bounded loader."""
    path = tmp_path / "bomb.yaml"
    path.write_text(billion_laughs())
    load_config(_write(tmp_path / "warm.yaml", UNET))  # imports and the model registry, outside the measurement
    import medseg_flows.settings  # noqa: F401  (imported outside the measurement too)

    tracemalloc.start()
    try:
        with pytest.raises(ConfigError, match="alias bomb"):
            loader(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * 2**20, f"peak {peak} bytes"


def test_medseg_config_cli_refuses_a_bomb_without_growing(tmp_path):
    """The CLI in a fresh process: exit 1, one error line naming the key, and no more memory than `--version`."""
    (tmp_path / "bomb.yaml").write_text(billion_laughs())
    code, baseline, err = _run_measured([sys.executable, "-m", "medseg", "--version"], tmp_path / "version.err")
    assert code == 0, err
    code, peak, err = _run_measured(
        [sys.executable, "-m", "medseg", "config", str(tmp_path / "bomb.yaml")], tmp_path / "config.err"
    )
    assert code == 1
    assert "Traceback" not in err
    assert f"{tmp_path / 'bomb.yaml'}: model.options: anchors and aliases expand" in err
    assert peak < baseline + 64 * 1024, f"peak RSS {peak} KiB against {baseline} KiB for --version"


def test_config_file_size_is_bounded(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text(UNET + "# " + "x" * MAX_CONFIG_BYTES + "\n")
    with pytest.raises(ConfigError, match=rf"{path}: larger than {MAX_CONFIG_BYTES} bytes"):
        load_config(path)


def test_limits_leave_real_configs_alone(tmp_path, capsys):
    """What people write still loads: anchors reused a few times, 1e-3 as a number, dotted names,
    valid-padding sizes."""
    path = _write(
        tmp_path / "ok.yaml",
        (
            "name: unet_em.v2-final\n"
            "model: {name: unet, options: &opts {dropout: 0.0, padding: valid}}\n"
            "train: {learning_rate: 1e-3, patch_size: [572, 572], batch_size: 512, epochs: 100000}\n"
            "infer: {roi_size: [572, 572], overlap: 0.9}\n"
            "augment: {rotate_degrees: 180, scale: [0.5, 2]}\n"
            "preprocess: {spacing: [0.004, 0.004, 0.05]}\n"
            "output_dir: ../runs with spaces/x\n"
        ),
    )
    config = load_config(path)
    assert config.train.learning_rate == 0.001 and config.name == "unet_em.v2-final"
    assert config.model.options == {"dropout": 0.0, "padding": "valid"}
    assert config.output_dir == tmp_path.parent / "runs with spaces" / "x"
    assert main(["config", str(path)]) == 0
    assert "unet_em.v2-final" in capsys.readouterr().out


def test_yaml_limits_are_exact():
    """Depth and alias counts at the limit load; one more is refused."""
    nested = "[" * (MAX_YAML_DEPTH - 1) + "]" * (MAX_YAML_DEPTH - 1)
    assert load_yaml("x: " + nested) is not None
    with pytest.raises(YamlLimitError, match="levels deep"):
        load_yaml("x: [" + nested + "]")
    aliases = ", ".join(["*a"] * MAX_YAML_ALIASES)
    assert len(load_yaml(f"a: &a 1\nb: [{aliases}]")["b"]) == MAX_YAML_ALIASES
    with pytest.raises(YamlLimitError, match="aliases"):
        load_yaml(f"a: &a 1\nb: [{aliases}, *a]")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _run_measured(args: list[str], err_path: Path) -> tuple[int, int, str]:
    """Exit code, peak RSS in KiB (of this child alone: wait4's rusage) and stderr of a command."""
    with open(os.devnull, "w") as devnull, open(err_path, "w") as err_file:
        proc = subprocess.Popen(args, stdout=devnull, stderr=err_file)
        _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss, err_path.read_text()
