"""The review page of a batch output folder, and the local server `medseg view` runs.

``write_review(output_dir)`` reads ``predictions.json`` (and ``metrics.json`` where
`medseg evaluate` wrote one) and writes, beside them:

- ``review.html``: one self-contained page (inline CSS, JS and plots; nothing is fetched
  from the network): batch summary, Dice distribution and learning curves, the failed
  scans with their reasons, a table of cases (thumbnail, status, Dice / IoU per class)
  and a slice viewer (slice slider, axis switch, window/level, overlay opacity, per-class
  colours and toggles, reference outline).
- ``review/case-NNNN.js``: one file per case, loaded only when the case is opened. It
  calls ``medsegReview.receive({...})`` with the scan, predicted mask and reference mask
  (zlib-compressed, base64) downsampled to at most ``MAX_EDGE`` pixels per in-plane axis
  and ``MAX_VOXELS`` voxels. A script file (not ``fetch``) so the page also works opened
  straight from disk (``file://``, where Chromium blocks fetch) as well as over http.

Thumbnails are inline ``data:`` images, so the folder gains no image file that
`medseg evaluate --pred` would mistake for a mask. Class colours are those of
``medseg.export.CLASS_COLOURS`` in the order DICOM SEG numbers its segments: every
class except the one valued 0 (background, not drawn), in ``classes`` order.

predictions.json is untrusted (a folder can be copied from anywhere), so the page embeds a
mask only from inside the output folder and a scan only from inside the batch's input
folder (or the output folder), after resolving links; a record naming anything else is
shown as a problem line, never read. The server answers only well-formed paths below its
folder: malformed ones get 400, missing ones (and links out) 404, and no traceback.
"""

from __future__ import annotations

import base64
import contextvars
import datetime as _dt
import html
import json
import logging
import math
import os
import re
import string
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

from tqdm import tqdm

from medseg import __version__
from medseg.errors import MedsegError
from medseg.files import atomic_write_text, journal_root, tidy_journal
from medseg.review.batch import (
    DATA_FOLDER,
    MAX_EDGE,
    MAX_VOXELS,
    PAGE_NAME,
    ReviewError,
    Case,
    evaluate_in_memory,
    inside,
    read_metrics,
    record_notes,
    reference_index,
    allowed_scan_roots,
    class_legend,
    find_learning_curves,
    read_batch,
)
from medseg.review.encode import build_case, script_json

__all__ = ["write_review"]


log = logging.getLogger(__name__)


def write_review(
    output_dir: Path | str,
    reference_dir: Path | str | None = None,
    learning_curves: Path | str | None = None,
    progress: bool | None = None,
) -> Path:
    """Write ``review.html`` and ``review/`` into a batch output folder; returns the page's path.

    reference_dir: reference masks (paired by case id) drawn as outlines; default: the
    reference folder named in metrics.json, where it still exists.
    learning_curves: a training run's learning_curves.png; default: the one in the run
    folder of the checkpoint named in predictions.json, if there is one.
    progress: show a progress bar (default: when stderr is a terminal).
    """
    output_dir = Path(output_dir)
    with journal_root(output_dir):  # temporary files under review/ are journalled where cleanup looks
        page = _write_review(output_dir, reference_dir, learning_curves, progress)
    tidy_journal(output_dir)
    return page


def _write_review(
    output_dir: Path, reference_dir: Path | str | None, learning_curves: Path | str | None, progress: bool | None
) -> Path:
    batch = read_batch(output_dir)
    classes: dict[str, int] = batch["classes"]
    legend = class_legend(classes)
    notes: list[str] = []
    metrics = read_metrics(output_dir, notes)
    if reference_dir is None and metrics and metrics.get("reference_folder"):
        candidate = Path(metrics["reference_folder"])
        reference_dir = candidate if candidate.is_dir() else None
    elif reference_dir is not None and not Path(reference_dir).is_dir():
        raise ReviewError(f"{reference_dir}: no such folder; pass the folder of reference masks (named by case id)")
    references = reference_index(Path(reference_dir), notes) if reference_dir is not None else {}
    if metrics is None and reference_dir is not None:
        metrics = evaluate_in_memory(output_dir, Path(reference_dir), classes, notes)
    curves = find_learning_curves(batch, Path(learning_curves) if learning_curves is not None else None, notes)
    scan_roots, scan_note = allowed_scan_roots(batch, output_dir)
    if scan_note:
        notes.append(scan_note)
    unpaired = (metrics or {}).get("unpaired_predictions") or []
    if unpaired:
        notes.append(
            f"{len(unpaired)} case(s) have no reference mask, so no scores: "
            + ", ".join(unpaired[:10])
            + (" and more" if len(unpaired) > 10 else "")
        )

    data_dir = output_dir / DATA_FOLDER
    if data_dir.is_symlink() or (data_dir.exists() and not inside(data_dir, output_dir)):
        raise ReviewError(
            f"{data_dir}: is a link (to {data_dir.resolve()}); medseg writes and prunes the page's "
            f"case files only inside {output_dir}, so remove the link and run again"
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    scores = {c["case"]: c for c in (metrics or {}).get("cases", [])}
    cases: list[Case] = []
    records = batch["records"]
    for index, record in enumerate(records, start=1):
        case = Case(
            index,
            str(record.get("case", f"case {index}")),
            str(record.get("kind", "")),
            str(record.get("status", "")),
            str(record.get("input", "")),
            str(record.get("reason", "")),
            float(record.get("seconds") or 0.0),
        )
        case.scores = scores.get(case.id, {}).get("classes", {})
        case.notes.extend(record_notes(record))
        cases.append(case)

    def build(case: Case) -> None:
        if case.status not in ("written", "skipped"):
            return
        try:
            build_case(case, records[case.index - 1], output_dir, legend, references.get(case.id), data_dir, scan_roots)
        except (MedsegError, OSError, ValueError, MemoryError) as exc:
            case.notes.append(f"cannot show this case: {type(exc).__name__}: {exc}")

    show = progress if progress is not None else sys.stderr.isatty()
    # Threads: reading (gzip) and compressing (zlib) release the GIL; a few scans in memory at once.
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        context = contextvars.copy_context()  # the journal root travels into the worker threads
        built = pool.map(lambda case: context.copy().run(build, case), cases)
        for _ in tqdm(built, total=len(cases), desc="review", unit="case", disable=not show):
            pass
    _remove_stale(data_dir, {Path(c.file).name for c in cases if c.file})
    notes.extend(problem for c in cases for problem in c.problems)  # in case order, after the threads
    page = _page(output_dir, batch, legend, cases, metrics, curves, notes)
    return atomic_write_text(output_dir / PAGE_NAME, page)


WRITTEN_INDEX = ".medseg/review-files.json"  # (in the output folder) the case files the page wrote


def _remove_stale(data_dir: Path, keep: set[str]) -> None:
    """Delete case files an earlier page wrote and this one did not; a user's files there are never touched.

    Only names in the previous page's own index (``OUTPUT/.medseg/review-files.json``) that
    have the exact form medseg gives them are removed; then the index lists this page's files.
    """
    index = data_dir.parent / WRITTEN_INDEX
    try:
        previous = json.loads(index.read_text())
    except (OSError, ValueError):
        previous = []
    for name in previous if isinstance(previous, list) else []:
        if isinstance(name, str) and name not in keep and re.fullmatch(r"case-\d{4,}\.js", name):
            path = data_dir / name
            if path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)
    atomic_write_text(index, json.dumps(sorted(keep)))


def _asset(name: str) -> str:
    return resources.files("medseg.review").joinpath("assets", name).read_text(encoding="utf-8")


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, str):
        return value
    return f"{value:.3f}"


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _page(
    output_dir: Path,
    batch: Mapping[str, Any],
    legend: Sequence[Mapping[str, Any]],
    cases: Sequence[Case],
    metrics: Mapping[str, Any] | None,
    curves: Path | None,
    notes: list[str],
) -> str:
    from medseg.evaluation.plots import plot_dice_distribution

    e = html.escape
    classes = [x["name"] for x in legend] + [n for n in batch["classes"] if n not in {x["name"] for x in legend}]
    colours = {entry["name"]: tuple(entry["colour"]) for entry in legend}
    counts = {s: sum(c.status == s for c in cases) for s in ("written", "skipped", "failed")}

    plots = []
    dice = {name: [_number(c.scores.get(name, {}).get("dice")) for c in cases if c.scores] for name in classes}
    chart = plot_dice_distribution(dice, colours) if metrics else None
    if chart:
        plots.append(
            f'<figure class="card"><img alt="Dice per class" src="{_png_uri(chart)}"><figcaption>Dice per class: '
            "a box (quartiles, median) and one dot per case.</figcaption></figure>"
        )
    elif not metrics:
        notes.append(
            f"no metrics.json: run `medseg evaluate --pred {output_dir} --ref REFERENCE_MASKS`, or "
            "`medseg view --reference REFERENCE_MASKS --rebuild`, for Dice / IoU and reference outlines"
        )
    if curves is not None:
        plots.append(
            f'<figure class="card"><img alt="learning curves" src="{_png_uri(curves.read_bytes())}"><figcaption>'
            f"Learning curves of the training run ({e(str(curves))}).</figcaption></figure>"
        )

    failures = [(c.id, c.input, c.reason) for c in cases if c.status == "failed"]
    failures += [
        (f["case"], ", ".join(f.get("paths", [])), "evaluation: " + f["reason"])
        for f in (metrics or {}).get("failures", [])
    ]
    failure_items = "".join(
        f"<li><b>{e(case)}</b> <code>{e(path)}</code><br>{e(reason)}</li>" for case, path, reason in failures
    )

    summary = (metrics or {}).get("summary", {}).get("classes", {})
    head = (
        "".join(
            f'<th data-type="num"><span class="swatch" style="background:{_css(colours.get(n))}"></span>'
            f"{e(n)}<br>{m}</th>"
            for n in classes
            for m in ("Dice", "IoU")
        )
        if metrics
        else ""
    )
    rows = []
    for c in cases:
        cells = (
            "".join(
                _score_cell(c.scores.get(n, {}).get(m.lower()) if c.scores else None)
                for n in classes
                for m in ("Dice", "IoU")
            )
            if metrics
            else ""
        )
        thumb = f'<img class="thumb" alt="" loading="lazy" src="{c.thumbnail}">' if c.thumbnail else ""
        title = f' title="{e(c.reason)}"' if c.reason else ""
        shape = " x ".join(map(str, c.shape))
        rows.append(
            f'<tr class="case status-{e(c.status)}" data-index="{c.index}" tabindex="0"><td>{thumb}</td>'
            f'<td class="id">{e(c.id)}</td><td class="status"{title}>{e(c.status)}</td>{cells}<td>{e(c.kind)}</td>'
            f'<td>{shape}</td><td data-value="{c.seconds}">{c.seconds:.1f}</td></tr>'
        )
    foot = ""
    if metrics and summary:
        means = "".join(
            f"<td>{_fmt(summary.get(n, {}).get(m.lower(), {}).get('mean'))}</td>"
            for n in classes
            for m in ("Dice", "IoU")
        )
        foot = (
            f"<tfoot><tr><td></td><td>mean over {len(metrics.get('cases', []))} scored</td><td></td>{means}"
            '<td colspan="3"></td></tr></tfoot>'
        )

    legend_items = "".join(
        f'<label class="class"><input type="checkbox" data-class="{x["index"]}" checked>'
        f'<span class="swatch" style="background:{_css(x["colour"])}"></span>{e(x["name"])} '
        f"<small>({x['value']})</small></label>"
        for x in legend
    )
    background = [n for n, v in batch["classes"].items() if v == 0]
    data = {
        "classes": legend,
        "cases": [
            {"index": c.index, "id": c.id, "file": c.file, "status": c.status, "reason": c.reason, "notes": c.notes}
            for c in cases
        ],
    }
    fields = {
        "title": e(str(output_dir.resolve().name)),
        "css": _asset("review.css"),
        "js": _asset("review.js"),
        "generated": e(_dt.datetime.now().isoformat(timespec="seconds")),
        "version": e(str(batch.get("medseg_version", "?"))),
        "builder": e(__version__),
        "input": e(str(batch.get("input", ""))),
        "checkpoint": e(str(batch.get("checkpoint") or "(none recorded)")),
        "counts": f"{len(cases)} cases: {counts['written']} written, {counts['skipped']} skipped (up to date), "
        f"{counts['failed']} failed",
        "notes": "".join(f"<li>{e(n)}</li>" for n in notes),
        "plots": "".join(plots),
        "failure_count": str(len(failures)),
        "failures": f"<ul>{failure_items}</ul>" if failures else "<p class=muted>None.</p>",
        "head": head,
        "rows": "".join(rows),
        "foot": foot,
        "legend": legend_items or "<span class=muted>no classes to draw</span>",
        "background": e(", ".join(background) or "value 0"),
        "max_edge": str(MAX_EDGE),
        "max_voxels": f"{MAX_VOXELS:,}",
        "data": script_json(data),
    }
    return string.Template(_asset("review.html")).substitute(fields)


def _css(rgb: Sequence[int] | None) -> str:
    r, g, b = rgb or (128, 128, 128)
    return f"rgb({r},{g},{b})"


def _score_cell(value: Any) -> str:
    number = _number(value)
    if not math.isfinite(number):
        shown = "inf" if number == math.inf else "–"
        return f'<td class="score" data-value="">{shown}</td>'
    hue = round(120 * min(max(number, 0.0), 1.0))
    return f'<td class="score" data-value="{number}" style="background:hsl({hue},65%,85%)">{number:.3f}</td>'


# ----------------------------------------------------------------------------- the server
