"""Benchmark: how long from `prefect deployment run segment-study/nightly` to the first mask (issue #18).

Run from the repository root: ``python bench/nightly.py``. Prints a report and writes
bench/results/nightly.json. Everything runs for real with Prefect's default polling
intervals (a worker asks for work every 10 s, `medseg serve` every 10 s): a
``prefect server start --no-ui``, the process work pool ``medseg``, ``prefect deploy``
of the repository's prefect.yaml and one ``prefect worker start --pool medseg``; then
the same with ``medseg serve``. Each round starts a run with the ``prefect deployment
run`` command into a fresh output folder and times, from the moment that command starts:

- accepted: the command returned (the run exists, Scheduled);
- submitted (worker only): the worker logged that it started the run's process;
- flow started: the run's process logged "Beginning flow run" (Prefect and medseg imported);
- first mask: the first mask file appeared in the output folder;
- done: the run reached a final state.

The study is 3 small generated NIfTI volumes and the model a tiny 2D U-Net trained for a
few steps (as the tests do, with their helpers): the figures are the orchestration's
cost, not the model's. Rounds wait 0-10 s for the next poll by chance, so the median of
``--rounds`` rounds is reported with every round.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from prefect_live import BIN, server_process, start, stop, wait_until  # noqa: E402  (tests/prefect_live.py)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "nightly.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="medseg-bench-nightly-"))
    load_before = os.getloadavg()[0]
    try:
        results = measure(work, args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # The machine is shared: its 1-minute load average before and after says how contended the figures are.
    results["load_average_1min"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
    results["machine"] = f"{platform.node()}: {platform.processor() or platform.machine()}, 2 cores shared"
    results["date"] = datetime.date.today().isoformat()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    for path, rounds in results["paths"].items():
        print(f"{path}: median seconds from `prefect deployment run` ->", _medians(rounds))
    print(f"wrote {args.out}")


def measure(work: Path, rounds: int) -> dict:
    from conftest import tiny_em_config, write_em_pairs  # the tests' tiny U-Net and its data
    from medseg.data import phantoms
    from medseg.training.loop import train

    write_em_pairs(work / "train", slices=5)
    model = train(tiny_em_config(work / "train", work / "runs", "em2d", epochs=1, steps_per_epoch=5), progress=False)
    for index in range(3):
        volume = phantoms.ct_phantom(shape=(48, 40, 8), seed=index)
        phantoms.write_nifti(volume.image, volume.affine, work / "images" / f"vol{index}.nii.gz")
    config = work / "configs" / "nightly.yaml"
    config.parent.mkdir()
    config.write_text(
        f"parameters: {{input_dir: ../images, output_dir: ../out, checkpoint: {model.run_dir}, workers: 1}}\n"
    )
    results: dict = {"scans": 3, "rounds": rounds, "paths": {}}
    with server_process(work / "server") as (api, env):
        prefect = str(BIN / "prefect")
        subprocess.run([prefect, "work-pool", "create", "medseg", "--type", "process"], env=env, check=True)
        subprocess.run(
            [prefect, "--no-prompt", "deploy", "--all", "--prefect-file", str(REPO / "prefect.yaml")],
            cwd=work,
            env=env,
            check=True,
            capture_output=True,
        )
        log = work / "worker.log"
        worker = start([prefect, "worker", "start", "--pool", "medseg", "--name", "bench"], log, env)
        try:
            wait_until(lambda: "started!" in log.read_text(), 120, "the worker starting", [worker])
            results["paths"]["worker"] = [_round(work, env, log, f"worker-{n}") for n in range(rounds)]
        finally:
            stop(worker)
        log = work / "serve.log"
        serve = start([str(BIN / "medseg"), "serve", "--config", str(config)], log, env, cwd=work)
        try:
            wait_until(lambda: "medseg serve: serving" in log.read_text(), 120, "medseg serve starting", [serve])
            results["paths"]["medseg serve"] = [_round(work, env, log, f"serve-{n}") for n in range(rounds)]
        finally:
            stop(serve)
    return results


def _round(work: Path, env: dict[str, str], log: Path, name: str) -> dict[str, float]:
    out = work / name
    began = time.monotonic()
    started = subprocess.run(
        [str(BIN / "prefect"), "deployment", "run", "segment-study/nightly", "--param", f"output_dir={out}"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    times = {"accepted": time.monotonic() - began}
    run_name = re.search(r"Created flow run '([^']+)'", started.stdout).group(1)
    marks = {
        "submitted": f"Flow run '{run_name}' submitted to infrastructure",
        "flow started": f"Beginning flow run '{run_name}'",
    }
    while "first mask" not in times or "done" not in times:
        text = log.read_text()
        now = time.monotonic() - began
        for key, mark in marks.items():
            if key not in times and mark in text:
                times[key] = now
        if "first mask" not in times and list(out.glob("vol*.nii.gz")):
            times["first mask"] = now
        if f"Flow run '{run_name}' - Finished in state" in text:
            times["done"] = now
        if now > 600:
            raise TimeoutError(f"{name}: {times}")
        time.sleep(0.05)
    order = ["accepted", "submitted", "flow started", "first mask", "done"]
    times = {key: round(times[key], 2) for key in order if key in times}
    print(name, times, flush=True)
    return times


def _medians(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {key: round(statistics.median(r[key] for r in rounds), 1) for key in rounds[0]}


if __name__ == "__main__":
    main()
