"""Segment one scan, or a folder: the one per-scan path used by `medseg predict` and the segment-study flow.

discover → (skip if the ledger says the masks are intact) → load → predict → export →
record, scan by scan. The rules live here once:

- **Skip rule**: content, not file times (`medseg.ledger`): same input bytes, checkpoint,
  settings and medseg version, and every mask still has the size and hash it was written
  with. A truncated or edited mask is redone; outputs whose input has gone are listed as
  orphans, never deleted.
- **Case ids**: discovery's id for a scan; for an input discovery could not use, its path
  below the input root without suffix (`medseg.io.discover.case_id`). Paths built from a
  case id are sanitised and must resolve inside the output folder (`medseg.files`).
- **Failure rule**: anything that goes wrong inside one scan is that scan's failure, with
  one sentence; an error medseg did not expect also leaves its traceback in
  ``OUTPUT/logs/`` and the sentence says where. An input read that fails with a transient
  I/O error (a network share that hiccups) is retried twice. An output folder that cannot
  take more (full, read-only, permission withdrawn) stops the batch: `OutputUnwritable`,
  after which the reports of what was done are still written where possible.
- **Trust boundary**: before anything is written, the output must be outside the input
  tree (not equal, nested either way, or linked), not a file, writable (a probe file), and
  have room for a conservative estimate of the batch (the inputs' size: masks are at most
  one byte per voxel and compressed, inputs at least that).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from medseg import __version__
from medseg.errors import MedsegError, ScanError
from medseg.files import (
    atomic_path,
    atomic_write_text,
    contained_path,
    remove_own_temporaries,
    safe_part,
    sha256_file,
    tidy_journal,
)
from medseg.io import Discovery, LoadOptions, Problem, ScanRef, case_id, discover, load

__all__ = [
    "BatchReport",
    "CaseRecord",
    "Job",
    "OutputBusy",
    "OutputUnwritable",
    "output_lock",
    "SKIP_REASON",
    "check_disjoint",
    "check_reads_outside",
    "coding_of",
    "failure_reason",
    "prepare_output",
    "problem_record",
    "segment_folder",
    "segment_scan",
    "write_batch_manifest",
    "write_batch_reports",
]

SKIP_REASON = "unchanged input content, checkpoint and settings; masks intact (no model work)"
TRANSIENT_ERRNOS = frozenset(
    {
        errno.EIO,
        errno.EAGAIN,
        errno.ETIMEDOUT,
        errno.ESTALE,
        errno.EINTR,
        errno.EBUSY,
        errno.ECONNRESET,
        errno.ENETRESET,
        errno.EHOSTUNREACH,
    }
)
OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})
RETRY_DELAYS = (2.0, 10.0)  # seconds before the 1st and 2nd retry of a transient input read
PROBE_MARGIN_BYTES = 16 * 2**20  # predictions.json, metrics and the review page


class OutputUnwritable(MedsegError):
    """The output folder cannot take more: the batch stops (what was done is kept and reported)."""


class OutputBusy(MedsegError):
    """Another medseg run (CLI or flow) is writing this output folder now."""


LOCK_FILE = ".medseg/lock"


@contextmanager
def output_lock(output_dir: Path) -> Iterator[Path]:
    """Hold ``OUTPUT/.medseg/lock`` (PID, host, start time) while a batch writes the folder.

    Why: two runs on one folder (a manual `medseg predict` while the nightly flow runs, two
    workers) would compute every scan twice and race on the reports. The lock is created
    with O_EXCL, so exactly one run gets it; a lock whose process is gone (same host, PID
    not running) is stale and taken over; a lock of another host is respected, and the
    message says how to remove it if that run is gone.
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputUnwritable(f"--output {output_dir} is an existing file, not a folder; name a folder")
    path = contained_path(output_dir, "lock", folder=".medseg")
    path.parent.mkdir(parents=True, exist_ok=True)
    mine = json.dumps(
        {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    )
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
        except FileExistsError:
            holder = _lock_holder(path)
            if holder is None or _holder_alive(holder):
                shown = (
                    "an unreadable lock"
                    if holder is None
                    else (f"process {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}")
                )
                raise OutputBusy(
                    f"output folder {output_dir} is being written by {shown}; wait for that run to "
                    f"finish, or if it is gone, remove {path}"
                ) from None
            path.unlink(missing_ok=True)  # stale: its process has ended
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(mine)
        break
    else:
        raise OutputBusy(f"output folder {output_dir}: could not take {path} (another run keeps taking it)")
    try:
        yield path
    finally:
        if _lock_holder(path) == json.loads(mine):
            path.unlink(missing_ok=True)


def _lock_holder(path: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _holder_alive(holder: dict[str, Any]) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # another machine sharing the folder: not ours to judge
    try:
        os.kill(int(holder.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True
    return True


@dataclass
class CaseRecord:
    """What happened to one scan (small and JSON-ready: no arrays)."""

    case: str
    kind: str
    input: str
    status: str  # "written", "skipped" or "failed"
    outputs: list[str] = field(default_factory=list)
    reason: str = ""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


@dataclass
class BatchReport:
    input: str
    output: str
    checkpoint: str
    classes: dict[str, int]
    records: list[CaseRecord] = field(default_factory=list)
    orphans: list[dict[str, Any]] = field(default_factory=list)
    stopped: str = ""  # why the batch stopped early, if it did

    @property
    def failed(self) -> list[CaseRecord]:
        return [r for r in self.records if r.status == "failed"]

    def counts(self) -> dict[str, int]:
        out = {"written": 0, "skipped": 0, "failed": 0}
        for record in self.records:
            out[record.status] += 1
        return out


@dataclass(frozen=True)
class Job:
    """What every scan of a batch shares: small, immutable, cheap to send to a worker process."""

    output_dir: Path
    checkpoint: Path  # the file, not the run folder
    checkpoint_sha256: str
    classes: dict[str, int]
    color: str
    tta: bool
    formats: tuple[str, ...] | None = None
    overwrite: bool = False
    device: str = "auto"  # where a worker loads its model (the CLI passes its Predictor instead)
    coding: dict[str, Any] | None = None  # data.classes_coding of the checkpoint's config, for DICOM SEG
    memory_budget_mb: float | None = None  # per scan, checked from headers before decoding (None: default)
    retry_delays: tuple[float, ...] = field(default_factory=lambda: RETRY_DELAYS)

    def formats_for(self, ref: ScanRef) -> tuple[str, ...]:
        from medseg.export import default_formats

        return tuple(self.formats or default_formats(ref.kind))


def coding_of(config: Any) -> dict[str, Any] | None:
    """The config's ``data.classes_coding`` as plain data (it travels in a Job to worker processes)."""
    coding = config.data.classes_coding
    return None if coding is None else {name: entry.model_dump(mode="json") for name, entry in coding.items()}


def failure_reason(exc: BaseException) -> str:
    """A medseg error already names file, problem and fix; an OSError its file and what the system said."""
    if isinstance(exc, MedsegError):
        return str(exc)
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or exc} (the file changed or went away while the batch ran?)"
    return f"{type(exc).__name__}: {exc}"


def problem_record(problem: Problem, input_root: Path) -> CaseRecord:
    """The failed record of an input discovery could not use, under the id the file would have had."""
    path = Path(problem.paths[0])
    return CaseRecord(case_id(path, input_root), "unknown", str(path), "failed", reason=problem.reason)


def _identities(path: Path) -> list[tuple[int, int]]:
    """(device, inode) of ``path`` (or its nearest existing ancestor) and of every ancestor above it."""
    found = []
    current = Path(os.path.abspath(path))
    for folder in [current, *current.parents]:
        try:
            info = folder.stat()
        except OSError:
            continue  # not created yet
        found.append((info.st_dev, info.st_ino))
    return found


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        info = Path(path).stat()
    except OSError:
        return None
    return info.st_dev, info.st_ino


def check_disjoint(input_path: Path, output_dir: Path) -> None:
    """Inputs are never written: the output tree and the input tree must not overlap, even through links.

    Paths are compared resolved, and folders by (device, inode) too, so a bind mount or a
    link of either tree onto the other is caught; a link loop is refused with its sentence.
    """
    try:
        inputs = Path(input_path).resolve()
        input_tree = inputs.parent if inputs.is_file() else inputs
        output = Path(output_dir).resolve()
    except (OSError, RuntimeError) as exc:
        raise OutputUnwritable(
            f"--input {input_path} or --output {output_dir} cannot be resolved ({exc}); "
            "remove the link loop or choose other folders"
        ) from None
    same_path = output == input_tree or input_tree in output.parents or output in input_tree.parents
    tree_id, out_id = _identity(input_tree), _identity(output)
    same_inode = (tree_id is not None and tree_id in _identities(output)) or (
        out_id is not None and out_id in _identities(input_tree)
    )
    if same_path or same_inode:
        raise OutputUnwritable(
            f"output folder {output_dir} (resolved {output}) and input {input_path} (resolved {input_tree}) overlap"
            f"{' through a bind mount or hard link' if same_inode and not same_path else ''}; "
            "medseg never writes into the input tree nor reads its own outputs as inputs: "
            "choose an output folder outside the input folder"
        )


def check_reads_outside(ref: ScanRef, output_dir: Path) -> None:
    """A scan whose files lead into the output folder (a link to a mask) would be overwritten: refused."""
    try:
        root = output_dir.resolve()
        out_id = _identity(root)
        for path in ref.paths:
            real = path.resolve()
            if root in real.parents or (out_id is not None and out_id in _identities(real.parent)):
                raise ScanError(
                    path,
                    f"is a link into the output folder {output_dir} ({real})",
                    "medseg never reads its own outputs as inputs nor writes over an input; replace the "
                    "link with the file itself or remove it",
                )
    except (OSError, RuntimeError) as exc:
        raise ScanError(ref.paths, f"cannot be resolved ({exc})", "remove the link loop") from None


class _Discard(Exception):
    """Leaves an `atomic_path` block without committing its file (the write probe)."""


def _check_room(output_dir: Path, needed: int, what: str = "this batch") -> None:
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        raise OutputUnwritable(
            f"output folder {output_dir}: {free / 2**20:.0f} MB free, but {what} may need up to "
            f"{needed / 2**20:.0f} MB (the size of its inputs); free some space or choose another output folder"
        )


def _check_still_writable(job: Job, ref: ScanRef) -> None:
    """Before a scan's model work: the folder still takes writes and has room for this scan's masks.

    Why: once a disk is full or remounted read-only mid-batch, every further scan would
    compute its prediction only to fail at export; in the flow the scans run in parallel,
    so each stops here instead, cheaply, with the same sentence.
    """
    if not os.access(job.output_dir, os.W_OK):
        raise OutputUnwritable(
            f"output folder {job.output_dir}: no longer writable (read-only or permission "
            "withdrawn); the batch stopped, masks written so far are kept; fix it, then rerun the "
            "same command to resume"
        )
    _check_room(job.output_dir, sum(_size(p) for p in ref.paths) + PROBE_MARGIN_BYTES // 4, f"scan {ref.id}")


def prepare_output(input_path: Path, output_dir: Path, refs: Sequence[ScanRef] | None = None) -> list[Path]:
    """Check the output before any scan runs, then clear medseg's own litter of a killed run.

    The room needed is the size of ``refs``' files, or, where the caller has not discovered
    the scans yet (the flow discovers in its own task), of every file under ``input_path``:
    a walk of file sizes, not a second discovery that would parse every header again.

    Returns the temporary files removed (only those medseg's journal names, of dead processes).
    """
    check_disjoint(input_path, output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputUnwritable(
            f"--output {output_dir} is an existing file, not a folder; name a folder (it is created if missing)"
        )
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_path(output_dir / "medseg-probe", root=output_dir) as probe:
                probe.write_bytes(b"medseg write probe\n")
                raise _Discard  # the temporary file and its journal entry go; nothing is renamed
        except _Discard:
            pass
    except OSError as exc:
        raise OutputUnwritable(
            f"output folder {output_dir}: cannot write there ({exc.strerror or exc}); "
            "check its permissions and that the disk is mounted read-write"
        ) from None
    inputs = _tree_bytes(input_path) if refs is None else sum(_size(p) for ref in refs for p in ref.paths)
    needed = PROBE_MARGIN_BYTES + inputs
    _check_room(output_dir, needed)
    return remove_own_temporaries(output_dir)


def _tree_bytes(root: Path) -> int:
    """Bytes of every file under ``root`` (links not followed): at least what its scans hold."""
    if not root.is_dir():
        return _size(root)
    return sum(_size(Path(folder) / name) for folder, _, names in os.walk(root) for name in names)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _log_traceback(output_dir: Path, case: str, exc: BaseException) -> Path | None:
    """OUTPUT/logs/<case>.traceback.txt for an error medseg did not expect (None if that cannot be written)."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        path = contained_path(output_dir, safe_part(case.replace("/", "__")), ".traceback.txt", folder="logs")
        return atomic_write_text(path, f"medseg {__version__}, case {case}\n\n{text}", root=output_dir)
    except (OSError, MedsegError):
        return None


def _load_with_retries(ref: ScanRef, job: Job) -> Any:
    attempt = 0
    while True:
        try:
            return load(ref, LoadOptions(color=job.color, memory_budget_mb=job.memory_budget_mb))
        except OSError as exc:
            if exc.errno not in TRANSIENT_ERRNOS or attempt >= len(job.retry_delays):
                raise
            time.sleep(job.retry_delays[attempt])
            attempt += 1


def segment_scan(ref: ScanRef, job: Job, predictor: Callable[[], Any]) -> CaseRecord:
    """Load → predict → export → record one scan, unless its masks are intact (then no model work).

    ``predictor`` returns the Predictor, called only when the scan needs one (a worker
    loads its model on first use). Never raises for a problem of this scan; raises
    `OutputUnwritable` when the output folder can take no more.
    """
    from medseg import ledger
    from medseg.export import export_mask

    start = time.monotonic()
    record = CaseRecord(ref.id, ref.kind, str(ref.path), "written")
    try:
        key = ledger.scan_key(ref, job.checkpoint_sha256, job.tta, job.formats_for(ref))
        if not job.overwrite:
            outputs = ledger.find_outputs(job.output_dir, ref.id, key)
            if outputs is not None:
                record.status, record.reason = "skipped", SKIP_REASON
                record.outputs = [str(p) for p in outputs]
                return record
        check_reads_outside(ref, job.output_dir)
        _check_still_writable(job, ref)
        scan = _load_with_retries(ref, job)
        prediction = predictor().predict(scan)
        refused: list[str] = []  # a DICOM object this series cannot have; the other masks are still written
        outputs = export_mask(
            prediction.mask, scan, job.output_dir, job.classes, job.formats_for(ref), job.coding, notes=refused
        )
        ledger.remember(job.output_dir, ref.id, key, outputs, str(ref.path))
        record.outputs = [str(p) for p in outputs]
        record.notes = list(scan.notes) + list(scan.geometry.notes) + refused
    except OutputUnwritable:
        raise
    except MedsegError as exc:
        record.status, record.reason = "failed", str(exc)
    except OSError as exc:
        if exc.errno in OUTPUT_ERRNOS and _is_under(exc.filename, job.output_dir):
            raise OutputUnwritable(
                f"output folder {job.output_dir}: {exc.strerror} while writing {exc.filename or 'into it'}; "
                "the batch stopped, masks written so far are kept; free space or fix "
                "permissions, then rerun the same command to resume"
            ) from None
        record.status, record.reason = "failed", failure_reason(exc)
    except Exception as exc:  # noqa: BLE001 - one scan's surprise must not stop the batch
        log = _log_traceback(job.output_dir, ref.id, exc)
        where = f"; traceback in {log}" if log else ""
        record.status, record.reason = "failed", f"unexpected {failure_reason(exc)}{where}"
    record.seconds = round(time.monotonic() - start, 3)
    return record


def _is_under(filename: Any, folder: Path) -> bool:
    if not filename:
        return True  # an OSError without a file name during export came from the output side
    try:
        path = Path(os.fsdecode(filename)).resolve()
    except (TypeError, ValueError, OSError):
        return False
    root = folder.resolve()
    return path == root or root in path.parents


def segment_folder(
    predictor: Any,
    input_path: Path,
    output_dir: Path,
    formats: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> BatchReport:
    """Segment every scan under ``input_path`` with one Predictor; problems found by discovery are failures too.

    The reports (predictions.json, review page) are written whatever happened to the scans;
    if the output folder stopped taking writes, the report says so in ``stopped``. The
    folder is locked for the run (`output_lock`): a second run on it is refused at once.
    """
    found = discover(input_path)
    if not found.scans and not found.problems:
        raise ScanError(
            input_path, "holds no scan medseg can read", "point --input at DICOM series, NIfTI, TIFF or image files"
        )
    prepare_output(input_path, output_dir, found.scans)
    with output_lock(output_dir):
        return _segment_locked(predictor, input_path, output_dir, found, formats, overwrite, progress)


def _segment_locked(
    predictor: Any,
    input_path: Path,
    output_dir: Path,
    found: Discovery,
    formats: Sequence[str] | None,
    overwrite: bool,
    progress: bool | None,
) -> BatchReport:
    from tqdm import tqdm

    job = Job(
        output_dir,
        predictor.checkpoint_file,
        sha256_file(predictor.checkpoint_file),
        dict(predictor.classes),
        predictor.config.data.color,
        bool(predictor.tta),
        tuple(formats) if formats else None,
        overwrite,
        coding=coding_of(predictor.config),
        memory_budget_mb=predictor.memory_budget_mb,
    )
    report = BatchReport(str(input_path), str(output_dir), str(predictor.checkpoint_path), dict(predictor.classes))
    report.records += [problem_record(problem, input_path) for problem in found.problems]
    show = os.isatty(2) if progress is None else progress
    for ref in tqdm(found.scans, desc="predict", unit="scan", disable=not show):
        try:
            report.records.append(segment_scan(ref, job, lambda: predictor))
        except OutputUnwritable as exc:
            report.stopped = str(exc)
            break
    write_batch_reports(report, output_dir, [ref.id for ref in found.scans])
    return report


def write_batch_manifest(report: BatchReport, output_dir: Path) -> Path:
    """predictions.json: classes, checkpoint, one record per scan and the orphans (read by `medseg evaluate`)."""
    payload: dict[str, Any] = {
        "medseg_version": __version__,
        "input": report.input,
        "checkpoint": report.checkpoint,
        "classes": report.classes,
        "counts": report.counts(),
        "records": [asdict(r) for r in report.records],
        "orphans": report.orphans,
    }
    if report.stopped:
        payload["stopped"] = report.stopped
    return atomic_write_text(output_dir / "predictions.json", json.dumps(payload, indent=2), root=output_dir)


def write_batch_reports(
    report: BatchReport, output_dir: Path, cases: Sequence[str], reference_dir: Path | None = None
) -> list[Path]:
    """predictions.json and the review page, whatever happened to the scans.

    Orphans (ledger records of inputs that have gone) are collected here. A report that
    cannot be written is noted in ``report.stopped`` instead of raising: the masks are the
    product, the reports describe them.
    """
    from medseg import ledger

    report.orphans = ledger.orphans(output_dir, cases)
    written: list[Path] = []
    try:
        written.append(write_batch_manifest(report, output_dir))
    except OSError as exc:
        report.stopped = (
            report.stopped + "; " if report.stopped else ""
        ) + f"predictions.json not written ({exc.strerror or exc})"
        return written
    try:
        from medseg.review import write_review  # the page people open before they trust the masks

        written.append(write_review(output_dir, reference_dir=reference_dir, progress=False))
    except (MedsegError, OSError, ValueError) as exc:
        report.stopped = (
            report.stopped + "; " if report.stopped else ""
        ) + f"review page not written ({failure_reason(exc)})"
    tidy_journal(output_dir)
    return written
