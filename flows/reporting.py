"""The batch summary: the same files `medseg predict` and `medseg evaluate` write, plus Prefect artifacts.

Files in the output folder: predictions.json (classes and one record per scan, which
`medseg evaluate` reads), with a reference folder metrics.csv and metrics.json, and the
review page review.html (+ review/) that `medseg view` serves.
Artifacts, under stable keys so a person (or a script) finds the latest of each:
``segment-study-metrics`` (table: case, class, Dice, IoU) and ``segment-study-summary``
(markdown: counts, skips, failures with reasons, mean scores, where the files are).
The files are written first and never wait for the Prefect API; the artifacts go through
medseg_flows.api_guard, which waits a bounded time for an API that is away, then skips them
with one warning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from medseg.evaluation.evaluate import EvaluationReport, Failure
from medseg.evaluation.reports import write_reports
from medseg.pipeline import SKIP_REASON, BatchReport, CaseRecord, Job, write_batch_reports

from medseg_flows.api_guard import GUARD

__all__ = ["METRICS_KEY", "SUMMARY_KEY", "Outcome", "Summary", "publish_reports"]

METRICS_KEY = "segment-study-metrics"
SUMMARY_KEY = "segment-study-summary"


@dataclass
class Outcome:
    """One scan's end result: its record and, with a reference, its scores or why it was not scored."""

    record: CaseRecord
    scores: dict[str, Any] | None = None
    evaluation_failure: str | None = None


@dataclass
class Batch:
    """What the per-scan tasks left: one Outcome per input, reference ids, unreadable references."""

    outcomes: list[Outcome] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    reference_failures: dict[str, str] = field(default_factory=dict)
    cases: list[str] = field(default_factory=list)  # the ids of every scan discovered (the rest are orphans)
    stopped: str = ""  # why the batch stopped early (the output folder took no more), if it did
    not_done: list[str] = field(default_factory=list)  # scans not segmented because the batch stopped


@dataclass
class Summary:
    """What the flow returns and the summary artifact shows (small and JSON-ready)."""

    output_dir: str
    counts: dict[str, int]
    failures: dict[str, str] = field(default_factory=dict)
    evaluation_failures: dict[str, str] = field(default_factory=dict)
    reports: list[str] = field(default_factory=list)
    mean_dice: dict[str, float | None] = field(default_factory=dict)
    orphans: list[dict[str, Any]] = field(default_factory=list)
    stopped: str = ""
    not_done: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures and not self.evaluation_failures and not self.stopped

    def failure_message(self) -> str:
        """The Failed state's message: why the run stopped, if it did, the counts, and where the reasons are."""
        text = self.headline()
        if self.stopped:
            text = f"stopped early: {self.stopped}; {text}"
        if not (self.failures or self.evaluation_failures):
            return text
        manifest = Path(self.output_dir) / "predictions.json"
        written = any(Path(p).name == manifest.name for p in self.reports)  # not when the folder took no more
        return f"{text}; reasons in the summary artifact" + (f" and {manifest}" if written else "")

    def headline(self) -> str:
        c = self.counts
        text = f"{c['written']} written, {c['skipped']} skipped (up to date), {c['failed']} failed"
        if self.not_done:
            text += f", {len(self.not_done)} not segmented (the batch stopped)"
        if c["written"] == 0 and c["skipped"] and not c["failed"] and not self.stopped:
            text += "; nothing changed, so no model work was done"
        if self.evaluation_failures:
            text += f"; {len(self.evaluation_failures)} could not be scored"
        return text


@task(name="publish-reports", cache_policy=NO_CACHE)
def publish_reports(
    input_dir: Path,
    reference_dir: Path | None,
    job: Job,
    batch: Batch,
) -> Summary:
    """Write predictions.json (and metrics.*), publish the artifacts, log the headline."""
    report = BatchReport(
        str(input_dir),
        str(job.output_dir),
        str(job.checkpoint),
        dict(job.classes),
        [o.record for o in batch.outcomes],
        stopped=batch.stopped,
    )
    paths: list[Path] = []
    made = {o.record.case for o in batch.outcomes if o.record.status != "failed"}
    summary = Summary(
        output_dir=str(job.output_dir),
        counts=report.counts(),
        not_done=list(batch.not_done),
        failures={r.case: r.reason for r in report.failed},
        evaluation_failures={
            **{case: reason for case, reason in batch.reference_failures.items() if case in made},
            **{o.record.case: o.evaluation_failure for o in batch.outcomes if o.evaluation_failure},
        },
    )
    evaluation = None
    if reference_dir is not None:
        evaluation = _evaluation_report(job, reference_dir, batch)
        paths += write_reports(evaluation, job.output_dir)
        summary.mean_dice = {
            name: _finite(stats["dice"]["mean"]) for name, stats in evaluation.summary["classes"].items()
        }
    paths += write_batch_reports(report, job.output_dir, batch.cases, reference_dir)
    if report.stopped:
        get_run_logger().warning("segment-study: stopped early: %s", report.stopped)
    summary.stopped = report.stopped
    summary.orphans = report.orphans
    summary.reports = [str(p) for p in paths]
    get_run_logger().info("segment-study: %s; reports: %s", summary.headline(), ", ".join(p.name for p in paths))
    # Only now the API: the files above are the run's record whether or not it answers.
    if evaluation is not None:
        rows = _metric_rows(evaluation)
        description = f"Dice and IoU per case and class; {job.output_dir}/metrics.csv"
        GUARD.call(
            f"artifact {METRICS_KEY}",
            lambda: create_table_artifact(key=METRICS_KEY, table=rows, description=description),
        )
    markdown = _markdown(summary, input_dir, job, evaluation)
    GUARD.call(
        f"artifact {SUMMARY_KEY}",
        lambda: create_markdown_artifact(key=SUMMARY_KEY, markdown=markdown, description=summary.headline()),
    )
    return summary


def _evaluation_report(job: Job, reference_dir: Path, batch: Batch) -> EvaluationReport:
    """The same report `medseg evaluate` builds, from the scores the evaluate-scan tasks returned."""
    report = EvaluationReport(job.output_dir, reference_dir, dict(job.classes), "checkpoint", ("dice", "iou"))
    made = {o.record.case for o in batch.outcomes if o.record.status != "failed"}
    for outcome in batch.outcomes:
        case = outcome.record.case
        if outcome.scores is not None:
            report.cases.append(outcome.scores)
        elif outcome.evaluation_failure:
            report.failures.append(Failure(case, tuple(outcome.record.outputs), outcome.evaluation_failure))
        elif case in batch.reference_failures and case in made:
            report.failures.append(Failure(case, tuple(outcome.record.outputs), batch.reference_failures[case]))
        elif case in made:
            report.unpaired_predictions.append(case)
    report.unpaired_references = [case for case in batch.references if case not in made]
    return report


def _metric_rows(report: EvaluationReport) -> list[dict[str, Any]]:
    return [
        {"case": case["case"], "class": name, "dice": _finite(row["dice"]), "iou": _finite(row["iou"])}
        for case in report.cases
        for name, row in case["classes"].items()
    ]


def _finite(value: float) -> float | None:
    """JSON (and so an artifact) has no NaN: a class absent from both masks shows as empty."""
    return None if value is None or math.isnan(value) else round(float(value), 4)


def _markdown(summary: Summary, input_dir: Path, job: Job, evaluation: EvaluationReport | None) -> str:
    lines = [
        "# segment-study",
        "",
        f"**{summary.headline()}**",
        "",
        f"- input: `{input_dir}`",
        f"- output: `{job.output_dir}`",
        f"- checkpoint: `{job.checkpoint}` (sha256 {job.checkpoint_sha256[:12]})",
        f"- reports: {', '.join(f'`{Path(p).name}`' for p in summary.reports)}",
    ]
    if summary.stopped:
        lines += ["", f"**Stopped early:** {_cell(summary.stopped)}"]
        if summary.not_done:
            lines += ["", f"Not segmented: {', '.join(summary.not_done)}"]
    if summary.counts["skipped"]:
        lines += ["", f"Skipped scans: {SKIP_REASON}."]
    if summary.orphans:
        lines += ["", "## Orphaned outputs (input gone; kept)", "", "| case | input | outputs |", "| --- | --- | --- |"]
        lines += [f"| {o['case']} | {_cell(o['input'])} | {_cell(', '.join(o['outputs']))} |" for o in summary.orphans]
    if summary.failures:
        lines += ["", "## Failed scans", "", "| case | reason |", "| --- | --- |"]
        lines += [f"| {case} | {_cell(reason)} |" for case, reason in summary.failures.items()]
    if summary.evaluation_failures:
        lines += ["", "## Not scored", "", "| case | reason |", "| --- | --- |"]
        lines += [f"| {case} | {_cell(reason)} |" for case, reason in summary.evaluation_failures.items()]
    if evaluation is not None:
        lines += [
            "",
            f"## Mean scores over {len(evaluation.cases)} case(s)",
            "",
            "| class | Dice | IoU | n |",
            "| --- | --- | --- | --- |",
        ]
        for name, stats in evaluation.summary["classes"].items():
            lines.append(
                f"| {name} | {_num(stats['dice']['mean'])} | {_num(stats['iou']['mean'])} | {stats['dice']['n']} |"
            )
        if evaluation.unpaired_references:
            lines += ["", f"References without a mask: {', '.join(evaluation.unpaired_references)}"]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _num(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"
