"""Classes 7 and 8 of issue #15: configs cannot hurt, checkpoints are checked against themselves and the data."""

from __future__ import annotations

from pathlib import Path

import torch
from test_config_bounds import HOSTILE as HOSTILE_CONFIGS
from test_config_bounds import UNET, billion_laughs
from test_hostile import checkpoint_foreign, checkpoint_pickle_exploit, checkpoint_truncated

from conftest import checkpoint_v1_payload, em_nifti_scans
from hostile_corpus.checker import Case, Run, World
from hostile_corpus.common import predict, slug


# ============================================================================ 7. configs cannot hurt


def hostile_config(text: str, key: str, problem: str, command: str):
    def build(w: World) -> Run:
        path = w.root / "hostile.yaml"
        path.write_text(text)
        argv = ["config", str(path)] if command == "config" else ["train", "--config", str(path)]
        return Run(argv, None, 1, says=(f"{path}: {key}", problem))

    return build


def hostile_override(override: str, key: str, problem: str):
    def build(w: World) -> Run:
        path = w.root / "exp.yaml"
        path.write_text(UNET)
        return Run(["config", str(path), "--set", override], None, 1, says=(str(path), key, problem))

    return build


def alias_bomb_process(w: World) -> Run:
    """Refused while composing: no more memory than `medseg --version` (a valid config builds its model, so
    it is no baseline here). Before: 3.8 GB, killed."""
    path = w.root / "bomb.yaml"
    path.write_text(billion_laughs())
    return Run(
        ["config", str(path)],
        None,
        1,
        says=(f"{path}: model.options", "alias bomb"),
        process=True,
        rss_mb=16,
        baseline=["--version"],
    )


TRAIN_CONFIGS = ("alias_bomb", "zero_patch", "batch_1e9", "name_parent", "deep_nesting")
CONFIGS = [
    *(Case(slug(name), 7, "config", hostile_config(*spec, "config")) for name, spec in HOSTILE_CONFIGS.items()),
    *(Case(slug(name), 7, "train", hostile_config(*HOSTILE_CONFIGS[name], "train")) for name in TRAIN_CONFIGS),
    *(
        Case(f"override-{slug(k)}", 7, "config", hostile_override(o, k, p))
        for o, k, p in [
            ("train.batch_size=1e9", "train.batch_size", "less than or equal to 4096"),
            ("model.options.x=" + "[" * 100 + "]" * 100, "model.options.x", "levels deep"),
            ("name=../up", "name", "not a plain name"),
        ]
    ),
    Case("alias-bomb-in-a-fresh-process", 7, "config", alias_bomb_process),
]


# ============================================================================ 8. checkpoints are checked


def bad_checkpoint(make, *says: str):
    def build(w: World) -> Run:
        em_nifti_scans(w.inputs, ["a"])
        folder = w.root / "ckpt"
        folder.mkdir()
        path = make(w, folder)
        return Run(predict(w, ckpt=path), None, 1, says=(path.name, *says), watch=(Path("/tmp/medseg-pwned"),))

    return build


def _state(w: World):
    from medseg.training.checkpoint import load_checkpoint

    return load_checkpoint(w.model)


def _save(w: World, folder: Path, name: str, config=None, weights=None) -> Path:
    from medseg.training.checkpoint import Checkpoint, save_checkpoint

    state = _state(w)
    return save_checkpoint(Checkpoint(config or state.config, weights or state.weights), folder / name)


def wider(w, folder):
    config = _state(w).config.model_copy(deep=True)
    config.model.features = 16
    return _save(w, folder, "wider.pt", config=config)


def trimmed(w, folder):
    weights = dict(_state(w).weights)
    weights.pop(next(iter(weights)))
    return _save(w, folder, "trimmed.pt", weights=weights)


def schema1_fewer_classes(w, folder):
    torch.save(checkpoint_v1_payload(_state(w), classes={"membrane": 0}), folder / "fewer.pt")
    return folder / "fewer.pt"


def one_class_config(w, folder):
    state = _state(w)
    bad = state.config.dump()
    bad["data"]["classes"] = {"membrane": 0}
    torch.save({**checkpoint_v1_payload(state), "config": bad, "classes": {"membrane": 0}}, folder / "one.pt")
    return folder / "one.pt"


def string_weights(w, folder):
    payload = {"format": "medseg-checkpoint/2", "config": _state(w).config.dump(), "model": {"w": "not a tensor"}}
    torch.save(payload, folder / "strings.pt")
    return folder / "strings.pt"


def missing(w, folder):
    return folder / "absent.pt"


def empty_run_folder(w, folder):
    (folder / "run").mkdir()
    return folder / "run"


CHECKPOINTS = [
    Case("weights-of-another-width", 8, "predict", bad_checkpoint(wider, "weights do not fit the stored model config")),
    Case("a-tensor-missing", 8, "predict", bad_checkpoint(trimmed, "missing")),
    Case("schema-1-classes-differ", 8, "predict", bad_checkpoint(schema1_fewer_classes, "differ from its config")),
    Case("fewer-classes-than-outputs", 8, "predict", bad_checkpoint(one_class_config, "stored config is not valid")),
    Case("weights-not-tensors", 8, "predict", bad_checkpoint(string_weights, "without a config or weights")),
    Case(
        "pickle-that-runs-code",
        8,
        "predict",
        bad_checkpoint(lambda w, f: checkpoint_pickle_exploit(f), "refused to load"),
    ),
    Case("truncated", 8, "predict", bad_checkpoint(lambda w, f: checkpoint_truncated(f), "not a readable checkpoint")),
    Case(
        "foreign-state-dict",
        8,
        "predict",
        bad_checkpoint(lambda w, f: checkpoint_foreign(f), "not a medseg checkpoint"),
    ),
    Case("absent", 8, "predict", bad_checkpoint(missing, "not found")),
    Case("run-folder-without-best", 8, "predict", bad_checkpoint(empty_run_folder, "best.pt")),
]
