"""The reports of an evaluation: metrics.csv, metrics.json (strict JSON) and the console table."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from medseg.errors import ScanError
from medseg.evaluation.evaluate import SUMMARY_STATISTICS, EvaluationReport
from medseg.files import atomic_write_text, tidy_journal

__all__ = ["format_report", "write_reports"]


def write_reports(report: EvaluationReport, out_dir: Path | str | None = None) -> list[Path]:
    """Write metrics.csv and metrics.json into ``out_dir`` (default: the prediction folder)."""
    folder = Path(out_dir) if out_dir is not None else report.pred_dir
    if folder.is_file():
        folder = folder.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        csv_path = atomic_write_text(folder / "metrics.csv", _csv_text(report))
        json_text = json.dumps(_strict_json(report.to_dict()), indent=2, allow_nan=False)
        json_path = atomic_write_text(folder / "metrics.json", json_text + "\n")
        tidy_journal(folder)
    except OSError as exc:
        raise ScanError(
            folder,
            f"cannot write the metrics reports ({exc.strerror or exc})",
            "choose a writable folder with --output",
        ) from exc
    return [csv_path, json_path]


def format_report(report: EvaluationReport) -> str:
    """A table a person can read: per-case scores, per-class summaries, unpaired and failures."""
    headers = ["case", "class", *report.metrics, "pixel_acc"]
    rows = []
    for case in report.cases:
        for i, (name, scores) in enumerate(case["classes"].items()):
            acc = _fmt(case["pixel_accuracy"]) if i == 0 else ""
            rows.append([case["case"] if i == 0 else "", name, *(_fmt(scores[m]) for m in report.metrics), acc])
    lines = _table(headers, rows) if rows else ["no case scored"]
    summary = report.summary
    lines += ["", f"Summary over {len(report.cases)} case(s) (NaN, a class absent from both masks, left out):"]
    srows = [
        [name, metric, *(_fmt(stats[s]) for s in SUMMARY_STATISTICS)]
        for name, per_metric in summary["classes"].items()
        for metric, stats in per_metric.items()
    ]
    srows.append(["(all)", "pixel_acc", *(_fmt(summary["pixel_accuracy"][s]) for s in SUMMARY_STATISTICS)])
    lines += _table(["class", "metric", *SUMMARY_STATISTICS], srows)
    if "isbi_pixel_error" in summary:
        per_case = ", ".join(f"{c['case']} {_fmt(c['isbi_pixel_error'])}" for c in report.cases)
        lines.append(
            f"ISBI 2012 pixel error (1 - best F-score of cell pixels, pooled over all cases): "
            f"{_fmt(summary['isbi_pixel_error'])}; per case: {per_case}"
        )
    for case in report.cases:
        lines += [f"note {case['case']}: {note}" for note in case["notes"]]
    if report.unpaired_predictions:
        lines.append(
            f"Predictions without a reference ({len(report.unpaired_predictions)}): "
            + ", ".join(report.unpaired_predictions)
        )
    if report.unpaired_references:
        lines.append(
            f"References without a prediction ({len(report.unpaired_references)}): "
            + ", ".join(report.unpaired_references)
        )
    lines += [f"FAILED {f.case}: {f.reason}" for f in report.failures]
    if report.resample:
        resampled = sum(c.get("grid") == "resampled" for c in report.cases)
        lines.append(f"Resampling: {report.resample} neighbour onto the reference grid, in {resampled} case(s)")
    lines.append(f"{len(report.cases)} case(s) scored, {len(report.failures)} failed; classes: {report.classes_source}")
    return "\n".join(lines)


def _csv_text(report: EvaluationReport) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    isbi = ["isbi_pixel_error"] if report.isbi else []
    writer.writerow(["case", "class", "statistic", *report.metrics, "pixel_accuracy", *isbi])
    for case in report.cases:
        for name, scores in case["classes"].items():
            row = [case["case"], name, "", *(_cell(scores[m]) for m in report.metrics), _cell(case["pixel_accuracy"])]
            writer.writerow(row + [_cell(case[c]) for c in isbi])
    summary = report.summary
    for stat in SUMMARY_STATISTICS:
        for name, per_metric in summary["classes"].items():
            writer.writerow(["", name, stat, *(_cell(per_metric[m][stat]) for m in report.metrics), ""])
        writer.writerow(["", "", stat, *([""] * len(report.metrics)), _cell(summary["pixel_accuracy"][stat])])
    if isbi:
        writer.writerow(["", "", "pooled", *([""] * len(report.metrics)), "", _cell(summary["isbi_pixel_error"])])
    return buffer.getvalue()


def _cell(value: float) -> str:
    """repr keeps full precision and reads back with float(): 'nan', 'inf' included."""
    return str(value) if isinstance(value, int) else repr(float(value))


def _strict_json(value: Any) -> Any:
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value


def _fmt(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return "nan" if math.isnan(value) else ("inf" if math.isinf(value) else f"{value:.4f}")


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    rows = [list(headers), *rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(headers))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
