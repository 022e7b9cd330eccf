"""The segment-study Prefect flow: in process, on Dask, incremental, failure-isolated, and served for real.

Prefect reads its settings when first imported, so this module points PREFECT_HOME at a
temporary folder (never ~/.prefect) and turns telemetry off before importing it. One
temporary Prefect server (prefect_test_harness) serves the in-process runs; the
deployment test starts its own `prefect server start` and `medseg serve` processes on
loopback (tests/prefect_live.py) and stops them by process group.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from uuid import UUID

_PREFECT_HOME = tempfile.mkdtemp(prefix="medseg-test-prefect-")
atexit.register(shutil.rmtree, _PREFECT_HOME, True)
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ.pop("PREFECT_API_URL", None)
os.environ.update(
    {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_LOGGING_TO_API_ENABLED": "false",  # logs stay in the test output; fewer API calls
    }
)

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tifffile  # noqa: E402
from prefect.artifacts import Artifact  # noqa: E402
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName  # noqa: E402
from prefect.settings import PREFECT_API_URL, temporary_settings  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from medseg.data import phantoms  # noqa: E402
from medseg.cli import main  # noqa: E402
from medseg.errors import ConfigError  # noqa: E402
from medseg.evaluation.evaluate import evaluate_folders  # noqa: E402
from medseg.evaluation.reports import write_reports  # noqa: E402
from medseg.inference.predictor import Predictor  # noqa: E402
from medseg.training.loop import train  # noqa: E402

import medseg.pipeline.scan  # noqa: E402
from medseg_flows import model_cache  # noqa: E402
from medseg_flows.deployment import check_nightly  # noqa: E402
from medseg_flows.reporting import METRICS_KEY, SUMMARY_KEY  # noqa: E402
from medseg_flows.segment_study import ScansFailed, segment_study  # noqa: E402
from medseg_flows.settings import FlowParameters, load_nightly_config  # noqa: E402

from conftest import snapshot, tiny_em_config, write_em_pairs  # noqa: E402
from prefect_live import BIN, server_process, start, stop, wait_until  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXPECTED_MASKS = ["ct_series.nii.gz", "ct_series.seg.dcm", "ct_volume.nii.gz", "em_stack.tif"]


@pytest.fixture(scope="module")
def prefect_server():
    """One temporary Prefect server for the in-process flow runs of this module."""
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny 2D U-Net (membrane=0, cell=255), trained for seconds; it segments volumes slice by slice."""
    root = tmp_path_factory.mktemp("model")
    write_em_pairs(root, slices=5)
    return train(tiny_em_config(root, root / "runs", "em2d", epochs=2, steps_per_epoch=10), progress=False).run_dir


def write_study(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """A DICOM series, a NIfTI volume and a TIFF stack, each with a reference mask (small: fast)."""
    images, labels = root / "images", root / "labels"
    ct = phantoms.ct_phantom(shape=(24, 20, 5), seed=seed)
    phantoms.write_dicom_series(ct, images / "ct_series", order="shuffled", extension="", seed=seed)
    phantoms.write_nifti(ct.label, ct.affine, labels / "ct_series.nii.gz")
    volume = phantoms.ct_phantom(shape=(20, 24, 5), seed=seed + 1)
    phantoms.write_nifti(volume.image, volume.affine, images / "ct_volume.nii.gz")
    phantoms.write_nifti(volume.label, volume.affine, labels / "ct_volume.nii.gz")
    em = phantoms.em_phantom(shape=(48, 40, 3), cells=8, seed=seed)
    phantoms.write_tiff_stack(em.image, em.affine, images / "em_stack.tif")
    phantoms.write_tiff_stack(em.label, em.affine, labels / "em_stack.tif")
    return images, labels


def read_mask(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj) if path.name.endswith(".nii.gz") else tifffile.imread(path)


def records(output: Path) -> dict[str, dict]:
    return {r["case"]: r for r in json.loads((output / "predictions.json").read_text())["records"]}


@pytest.fixture(scope="module")
def first_run(prefect_server, model, tmp_path_factory) -> dict:
    """One thread-pool run over a fresh study; several tests read what it left."""
    root = tmp_path_factory.mktemp("study")
    images, labels = write_study(root)
    before = snapshot(images)
    loads = model_cache.loads()
    state = segment_study(
        input_dir=images, output_dir=root / "out", checkpoint=model, reference_dir=labels, return_state=True
    )
    return {
        "root": root,
        "images": images,
        "labels": labels,
        "output": root / "out",
        "state": state,
        "loads": model_cache.loads() - loads,
        "inputs_before": before,
    }


def test_flow_writes_masks_metrics_and_artifacts(first_run):
    out, state = first_run["output"], first_run["state"]
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary.counts == {"written": 3, "skipped": 0, "failed": 0}
    for name in EXPECTED_MASKS:
        assert (out / name).is_file(), name
    assert (out / "review.html").is_file()
    assert first_run["loads"] == 1  # one model for three scans
    assert snapshot(first_run["images"]) == first_run["inputs_before"]  # inputs untouched

    manifest = json.loads((out / "predictions.json").read_text())
    assert manifest["classes"] == {"membrane": 0, "cell": 255}
    assert {r["case"]: r["status"] for r in manifest["records"]} == dict.fromkeys(
        ["ct_series", "ct_volume", "em_stack"], "written"
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert [c["case"] for c in metrics["cases"]] == ["ct_series", "ct_volume", "em_stack"]

    # The same metrics.csv `medseg evaluate --pred OUT --ref LABELS` writes.
    again = first_run["root"] / "evaluate"
    write_reports(evaluate_folders(out, first_run["labels"], progress=False), again)
    assert (out / "metrics.csv").read_text() == (again / "metrics.csv").read_text()

    table = Artifact.get(METRICS_KEY)
    assert table is not None and table.type == "table"
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert {(r["case"], r["class"]) for r in rows} == {
        (c, k) for c in ("ct_series", "ct_volume", "em_stack") for k in ("membrane", "cell")
    }
    assert all(set(r) == {"case", "class", "dice", "iou"} for r in rows)
    stack = [r for r in rows if r["case"] == "em_stack" and r["class"] == "cell"][0]
    assert 0.0 <= stack["dice"] <= 1.0
    markdown = Artifact.get(SUMMARY_KEY)
    assert markdown is not None and "3 written, 0 skipped (up to date), 0 failed" in markdown.data


def test_rerun_skips_unchanged_scans_without_model_work(first_run, model, monkeypatch, tmp_path):
    # A copy of the first run's study and output, so this test may change them.
    images, out = tmp_path / "images", tmp_path / "out"
    shutil.copytree(first_run["images"], images)
    shutil.copytree(first_run["output"], out, copy_function=shutil.copy2)
    masks = {name: (out / name).stat().st_mtime_ns for name in EXPECTED_MASKS}

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not run for an unchanged scan")

    monkeypatch.setattr(Predictor, "predict", no_model)
    monkeypatch.setattr(Predictor, "__init__", no_model)
    loads = model_cache.loads()
    summary = segment_study(input_dir=images, output_dir=out, checkpoint=model)
    assert summary.counts == {"written": 0, "skipped": 3, "failed": 0}
    assert "no model work" in summary.headline()
    assert model_cache.loads() == loads
    assert {name: (out / name).stat().st_mtime_ns for name in EXPECTED_MASKS} == masks
    assert all(r["status"] == "skipped" and "no model work" in r["reason"] for r in records(out).values())
    assert "no model work was done" in Artifact.get(SUMMARY_KEY).data
    monkeypatch.undo()

    # Prefect's cache would miss both: a deleted mask, and new content under an old mtime.
    (out / "em_stack.tif").unlink()
    volume = images / "ct_volume.nii.gz"
    stat = volume.stat()
    other = phantoms.ct_phantom(shape=(20, 24, 5), seed=9)
    phantoms.write_nifti(other.image, other.affine, volume)
    os.utime(volume, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    summary = segment_study(input_dir=images, output_dir=out, checkpoint=model)
    assert summary.counts == {"written": 2, "skipped": 1, "failed": 0}
    assert {c: r["status"] for c, r in records(out).items()} == {
        "ct_series": "skipped",
        "ct_volume": "written",
        "em_stack": "written",
    }


def test_a_truncated_mask_is_redone_and_a_gone_inputs_masks_are_listed_as_orphans(first_run, model, tmp_path):
    """Integrity (issue #18 item 5): the ledger's size and hash catch a mask cut short by a full disk, and
    the masks of an input that has gone stay, listed in predictions.json and the summary artifact."""
    images, out = tmp_path / "images", tmp_path / "out"
    shutil.copytree(first_run["images"], images)
    shutil.copytree(first_run["output"], out, copy_function=shutil.copy2)
    (out / "ct_volume.nii.gz").write_bytes((out / "ct_volume.nii.gz").read_bytes()[:100])
    shutil.move(images / "em_stack.tif", tmp_path / "archived.tif")  # its mask em_stack.tif is now an orphan
    summary = segment_study(input_dir=images, output_dir=out, checkpoint=model)
    assert summary.counts == {"written": 1, "skipped": 1, "failed": 0}
    assert records(out)["ct_volume"]["status"] == "written" and (out / "ct_volume.nii.gz").stat().st_size > 100
    assert (out / "em_stack.tif").is_file()  # kept
    assert [o["case"] for o in summary.orphans] == ["em_stack"]
    assert [o["case"] for o in json.loads((out / "predictions.json").read_text())["orphans"]] == ["em_stack"]
    markdown = Artifact.get(SUMMARY_KEY).data
    assert "Orphaned outputs (input gone; kept)" in markdown and "em_stack.tif" in markdown


def test_corrupt_scan_fails_alone_and_io_errors_are_retried(prefect_server, model, monkeypatch, tmp_path):
    images, labels = write_study(tmp_path)
    good = nib.load(images / "ct_volume.nii.gz")
    corrupt = images / "corrupt_scan.nii"
    nib.save(nib.Nifti1Image(np.asarray(good.dataobj), good.affine), corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:1000])  # header intact, most of the voxels missing

    real_load, attempts = medseg.pipeline.scan.load, []

    def flaky_load(ref, options):
        if ref.path == images / "em_stack.tif":  # the scan, not its mask or reference
            attempts.append(1)
            if len(attempts) == 1:
                raise OSError(5, "Input/output error (network share hiccup)")
        return real_load(ref, options)

    monkeypatch.setattr(medseg.pipeline.scan, "load", flaky_load)  # the pipeline retries a transient read (2 s later)
    out = tmp_path / "out"
    state = segment_study(input_dir=images, output_dir=out, checkpoint=model, reference_dir=labels, return_state=True)

    assert state.is_failed()
    assert "3 written, 0 skipped (up to date), 1 failed" in state.message
    with pytest.raises(ScansFailed):
        state.result()
    assert len(attempts) == 2  # failed once with OSError, retried, written
    for name in EXPECTED_MASKS:
        assert (out / name).is_file(), name
    bad = records(out)["corrupt_scan"]
    assert bad["status"] == "failed" and "corrupt_scan.nii" in bad["reason"]
    assert not list(out.glob("corrupt_scan*"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["cases"]) == 3  # the reports are complete for the good scans
    assert "corrupt_scan" in Artifact.get(SUMMARY_KEY).data

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=["segment corrupt_scan"]))
        )
    assert [r.state.type.value for r in runs] == ["FAILED"]
    assert "corrupt_scan.nii" in runs[0].state.message


def test_dask_runner_gives_the_thread_pool_masks(first_run, model, tmp_path):
    pytest.importorskip("prefect_dask")
    out = tmp_path / "dask"
    summary = segment_study(
        input_dir=first_run["images"],
        output_dir=out,
        checkpoint=model,
        reference_dir=first_run["labels"],
        task_runner="dask",
        workers=1,
    )
    assert summary.counts == {"written": 3, "skipped": 0, "failed": 0}
    for name in EXPECTED_MASKS:
        if name.endswith(".seg.dcm"):
            continue  # new UIDs per write; its pixels equal the NIfTI's (tests/test_predict.py)
        assert np.array_equal(read_mask(out / name), read_mask(first_run["output"] / name)), name
    assert (out / "metrics.csv").read_text().replace(str(out), "") == (
        first_run["output"] / "metrics.csv"
    ).read_text().replace(str(first_run["output"]), "")


def test_missing_prefect_dask_fails_at_start_with_install_command(
    prefect_server, first_run, model, monkeypatch, tmp_path
):
    monkeypatch.setitem(sys.modules, "prefect_dask", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'medseg\[dask\]'"):
        segment_study(input_dir=first_run["images"], output_dir=tmp_path / "out", checkpoint=model, task_runner="dask")
    assert not (tmp_path / "out").exists()
    nightly = tmp_path / "nightly.yaml"
    nightly.write_text(f"parameters: {{input_dir: in, output_dir: out, checkpoint: {model}, task_runner: dask}}\n")
    with pytest.raises(ConfigError, match=r"pip install 'medseg\[dask\]'"):
        check_nightly(load_nightly_config(nightly))


def test_nightly_config_matches_the_flow(capsys):
    config = load_nightly_config(REPO / "configs" / "nightly.yaml")
    assert config.schedule.cron == "0 2 * * *"
    assert config.parameters.input_dir.is_absolute()  # resolved against configs/
    assert set(FlowParameters.model_fields) == set(segment_study.parameters.properties)


def test_nightly_config_errors_name_file_and_key(tmp_path, capsys):
    bad = tmp_path / "nightly.yaml"
    bad.write_text("schedule: {cron: '0 2 * * *', timzone: UTC}\nparameters: {input_dir: a, output_dir: b}\n")
    assert main(["serve", "--config", str(bad), "--check"]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: schedule.timzone: unknown key" in err
    assert "give either 'checkpoint'" in err


def test_worker_device_gives_each_dask_worker_its_gpu(monkeypatch):
    monkeypatch.setattr(model_cache, "gpu_count", lambda: 2)
    monkeypatch.setattr(model_cache, "_dask_worker_index", lambda: 3)
    assert model_cache.worker_device("auto") == "cuda:1"
    assert model_cache.worker_device("cpu") == "cpu"
    monkeypatch.setattr(model_cache, "_dask_worker_index", lambda: None)
    assert model_cache.worker_device("auto") == "auto"


# ---------------------------------------------------------------------------------------------
# The deployment, for real: prefect server start, medseg serve, prefect deployment run.


def test_nightly_deployment_served_and_run_by_name(model, tmp_path):
    images, labels = write_study(tmp_path)
    nightly = tmp_path / "nightly.yaml"
    nightly.write_text(
        "schedule: {cron: '0 2 * * *', timezone: UTC}\n"
        f"parameters: {{input_dir: images, output_dir: out-nightly, checkpoint: {model}, reference_dir: labels}}\n"
    )
    with server_process(tmp_path / "server", PREFECT_RUNNER_POLL_FREQUENCY="1") as (api, env):
        serve = start([str(BIN / "medseg"), "serve", "--config", str(nightly)], tmp_path / "serve.log", env, tmp_path)
        try:
            with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:

                def deployed() -> bool:
                    try:
                        return client.read_deployment_by_name("segment-study/nightly") is not None
                    except Exception:
                        return False

                wait_until(deployed, 90, "medseg serve registering segment-study/nightly", [serve])
                deployment = client.read_deployment_by_name("segment-study/nightly")
                assert deployment.schedules[0].schedule.cron == "0 2 * * *"
                assert deployment.parameters["input_dir"] == str(images)

                started = subprocess.run(
                    [
                        str(BIN / "prefect"),
                        "deployment",
                        "run",
                        "segment-study/nightly",
                        "--param",
                        f"output_dir={tmp_path / 'out-manual'}",
                    ],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=True,
                )
                run_id = UUID(next(line.split()[-1] for line in started.stdout.splitlines() if "UUID" in line))
                wait_until(lambda: client.read_flow_run(run_id).state.is_final(), 120, "the nightly flow run", [serve])
                state = client.read_flow_run(run_id).state
        finally:
            stop(serve)
    assert state.is_completed(), f"{state.name}: {state.message}\n{(tmp_path / 'serve.log').read_text()[-3000:]}"
    out = tmp_path / "out-manual"
    for name in EXPECTED_MASKS + ["predictions.json", "metrics.csv", "metrics.json"]:
        assert (out / name).is_file(), name
    assert not (tmp_path / "out-nightly").exists()  # --param replaced the default for this run only


def test_one_run_per_output_folder(prefect_server, model, tmp_path):
    """A folder a live run holds is refused before any scan (flow and CLI share the lock); a stale lock of a
    process that has gone is taken over, and released at the end."""
    from medseg.pipeline import LOCK_FILE, output_lock

    images, _ = write_study(tmp_path)
    out = tmp_path / "out"
    with output_lock(out):
        state = segment_study(input_dir=images, output_dir=out, checkpoint=model, return_state=True)
        assert state.is_failed() and "is being written by process" in state.message
        assert not list(out.glob("*.nii.gz")) and not (out / "predictions.json").exists()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "medseg",
                "predict",
                "--checkpoint",
                str(model),
                "--input",
                str(images),
                "--output",
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 1 and "is being written by process" in done.stderr, done.stderr
    gone = subprocess.Popen(["true"])
    gone.wait()
    (out / LOCK_FILE).write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(), "started": "then"}))
    state = segment_study(input_dir=images, output_dir=out, checkpoint=model, return_state=True)
    assert "is being written" not in (state.message or "") and records(out)
    assert not (out / LOCK_FILE).exists()


def test_serve_takes_set_overrides_and_says_how_to_create_a_missing_checkpoint(model, tmp_path, capsys):
    """`medseg serve --set parameters.KEY=VALUE` overrides the nightly config (as --set does for experiment
    configs); a checkpoint that does not exist yet is refused naming the command that creates it."""
    nightly = REPO / "configs" / "nightly.yaml"
    (tmp_path / "in").mkdir()
    args = ["serve", "--config", str(nightly), "--check", "--set", f"parameters.input_dir={tmp_path / 'in'}"]
    assert main([*args, "--set", f"parameters.checkpoint={model}"]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint: {model}" in out and f"input_dir: {tmp_path / 'in'}" in out

    experiment = tmp_path / "exp.yaml"
    experiment.write_text(f"name: never_trained\noutput_dir: {tmp_path / 'runs'}\nmodel: {{name: unet}}\n")
    missing = [*args, "--set", "parameters.checkpoint=null", "--set", f"parameters.config={experiment}"]
    assert main(missing) == 1
    err = capsys.readouterr().err
    assert "no checkpoint yet" in err and f"medseg train --config {experiment}" in err and "Traceback" not in err
    assert main([*args, "--set", "parameters.nope=1"]) == 1
    assert "parameters.nope: unknown key" in capsys.readouterr().err


def test_the_flow_hands_out_a_bounded_window_of_scans():
    """A batch whose output stops taking writes stops after at most the window: twice the workers."""
    from medseg_flows.runners import in_flight

    assert in_flight("threads") == 4 and in_flight("threads", 3) == 6
    assert in_flight("dask", 5) == 10
    assert in_flight("dask", None, "tcp://10.0.0.1:8786") == 64  # a cluster of unknown size
    assert in_flight("dask", 8, "tcp://10.0.0.1:8786") == 16


def test_a_stopped_run_says_so_first_and_points_only_at_reports_it_wrote(tmp_path):
    from medseg_flows.reporting import Summary

    counts = {"written": 1, "skipped": 0, "failed": 0}
    stopped = Summary(str(tmp_path), counts, stopped="output folder X: Read-only file system", not_done=["b", "c"])
    assert not stopped.ok
    assert stopped.failure_message() == (
        "stopped early: output folder X: Read-only file system; 1 written, 0 skipped (up to date), 0 failed, "
        "2 not segmented (the batch stopped)"
    )
    failed = Summary(
        str(tmp_path),
        {"written": 1, "skipped": 0, "failed": 1},
        failures={"b": "unreadable"},
        reports=[str(tmp_path / "predictions.json")],
    )
    assert failed.failure_message().endswith(f"reasons in the summary artifact and {tmp_path / 'predictions.json'}")
    unwritten = Summary(str(tmp_path), {"written": 0, "skipped": 0, "failed": 1}, failures={"b": "unreadable"})
    assert "predictions.json" not in unwritten.failure_message()
