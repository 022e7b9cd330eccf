"""The hostile corpus of issue #15: every class of "What must hold", several generated cases each, one checker.

Each row of ``CASES`` builds one hostile situation in a sandbox (inputs, an output root, a user's files
beside and inside it) and names the medseg command a user would run on it: predict, evaluate, train,
view, data, info, config, demo, and the segment-study flow (slow). `hostile_corpus.checker.check` runs it and
asserts the whole list of the issue for every row alike: exit status, one line naming the file and the
problem, no traceback, nothing changed outside the output root, inputs and a user's files byte-identical,
no temporary leftovers, the umask honoured, and for bombs the peak RSS of a fresh process.

The builders, one module per class or two, are in tests/hostile_corpus/; the hostile inputs themselves
come from the focused tests (test_hostile, test_budgets, test_geometry_sanity, test_config_bounds) and
conftest: the corpus adds what they lacked, the same end-to-end checks for every case and every command.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from conftest import em_nifti_scans
from hostile_corpus.checker import CLASSES, Case, Run, World, check
from hostile_corpus.common import COMMANDS, went_on
from hostile_corpus.containment import CONTAINMENT
from hostile_corpus.models import CHECKPOINTS, CONFIGS
from hostile_corpus.outputs import LITTER, OUTPUT_FIRST, UMASK
from hostile_corpus.own_masks import OWN_MASKS
from hostile_corpus.scans import BUDGETS, GEOMETRY, ONE_SCAN, SCAN_CASES
from hostile_corpus.servers import SERVERS
from hostile_corpus.signals import SIGNALS
from hostile_corpus.user_paths import USER_PATHS
from medseg.data import phantoms


@pytest.fixture(scope="session")
def benign(tmp_path_factory) -> dict[str, Path]:
    """Inputs of the baseline runs a bomb's peak RSS is compared with (shared, so each baseline runs once)."""
    root = tmp_path_factory.mktemp("benign")
    return {
        "nifti": phantoms.write_nifti(np.zeros((8, 8, 8), np.uint8), np.eye(4), root / "in" / "v.nii.gz"),
        "out": root / "out",
    }


# ============================================================================ the flow (a Prefect server: slow)


@pytest.fixture(scope="module")
def prefect_harness(tmp_path_factory):
    """A temporary Prefect server for the flow cases (its start-up alone takes ~15 s here)."""
    os.environ.setdefault("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect")))
    os.environ.update({"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"})
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _prefect_console_to_this_test() -> None:
    """Prefect's console handlers keep the stderr they were made with: under pytest, the capture of
    the first test that logged, closed by the next one (a "Logging error" traceback there). Point them
    at this test's stderr, as a process of its own would have them."""
    import logging
    import sys

    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [
        logging.getLogger(),
        *(x for x in logging.root.manager.loggerDict.values() if isinstance(x, logging.Logger)),
    ]
    for handler in {h for logger in loggers for h in logger.handlers if isinstance(h, PrefectConsoleHandler)}:
        handler.stream = sys.stderr  # not setStream: it flushes the closed one first
        handler.console.file = sys.stderr


def flow_call(w: World, inputs: Path, out: Path):
    def call() -> tuple[int, str]:
        import medseg_flows  # noqa: F401  (Prefect's privacy defaults first)
        from medseg_flows.segment_study import segment_study

        _prefect_console_to_this_test()

        state = segment_study(input_dir=inputs, output_dir=out, checkpoint=w.model, return_state=True)
        return (0 if state.is_completed() else 1), f"flow run {state.name}: {state.message}"

    return call


def flow_bad_scan(w: World) -> Run:
    w.fixture("prefect_harness")
    em_nifti_scans(w.inputs, ["good"])
    (w.inputs / "broken.nii.gz").write_bytes(b"\x1f\x8b not gzip")
    return Run(
        [],
        w.out,
        1,
        says=("flow run Failed", "1 failed"),
        call=flow_call(w, w.inputs, w.out),
        after=went_on(w, "good.nii.gz"),
    )


def flow_output_is_input(w: World) -> Run:
    w.fixture("prefect_harness")
    em_nifti_scans(w.inputs, ["a"])
    return Run([], None, 1, says=("overlap", str(w.inputs)), call=flow_call(w, w.inputs, w.inputs))


def flow_read_only_mid_batch(w: World) -> Run:
    """The output remounted read-only after two scans: the run stops as one, with one sentence, and hands
    out no more scans (at most the window already handed out try and stop on the same sentence)."""
    from medseg.inference.predictor import Predictor

    w.fixture("prefect_harness")
    em_nifti_scans(w.inputs, [f"s{k}" for k in range(6)])
    mount = w.mount(w.out.parent / "disk", size="32m")
    out = mount / "out"
    real, done = Predictor.predict, []

    def predict_then_remount(self, scan, probabilities=False):
        result = real(self, scan, probabilities)
        done.append(scan.ref.id)
        if len(done) == 2:
            w.remount(mount, read_only=True)
        return result

    return Run(
        [],
        out,
        1,
        says=("flow run Failed", "stopped early", "Read-only file system"),
        call=flow_call(w, w.inputs, out),
        patches=[(Predictor, "predict", predict_then_remount)],
    )


FLOW = [
    Case("bad-scan-fails-alone", 4, "flow", flow_bad_scan, slow=True),
    Case(
        "output-is-input",
        1,
        "flow",
        flow_output_is_input,
        slow=True,
    ),
    Case(
        "read-only-mid-batch",
        3,
        "flow",
        flow_read_only_mid_batch,
        slow=True,
    ),
]


# ============================================================================ the corpus

CASES = [
    *CONTAINMENT,
    *LITTER,
    *OWN_MASKS,
    *OUTPUT_FIRST,
    *ONE_SCAN,
    *SCAN_CASES,
    *BUDGETS,
    *GEOMETRY,
    *CONFIGS,
    *CHECKPOINTS,
    *SIGNALS,
    *SERVERS,
    *UMASK,
    *USER_PATHS,
    *FLOW,
]


def _param(case: Case):
    marks = [pytest.mark.slow] if case.slow else []
    if case.xfail:
        marks.append(pytest.mark.xfail(reason=case.xfail, strict=True))
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_hostile_case(case: Case, tmp_path: Path, request, monkeypatch, capfd, caplog) -> None:
    world = World(tmp_path / "sandbox", tmp_path / "scratch", request)
    check(case, world, monkeypatch, capfd, caplog)


def test_the_corpus_covers_every_class_and_command() -> None:
    fast = [c for c in CASES if not c.slow]
    assert len(fast) >= 120, len(fast)
    assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"
    per_class = {k: sum(c.klass == k for c in fast) for k in CLASSES}
    assert min(per_class.values()) >= 3, per_class
    assert set(COMMANDS) <= {c.command for c in fast}
