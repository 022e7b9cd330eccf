"""Segment one scan, or a folder: the one per-scan path used by `medseg predict` and the segment-study flow.

discover → (skip if the ledger says the masks are intact) → load → predict → export →
record, scan by scan. The rules live here once:

- **Skip rule**: content, not file times (`medseg.pipeline.ledger`): same input bytes, checkpoint,
  settings and medseg version, and every mask still has the size and hash it was written
  with. A truncated or edited mask is redone; outputs whose input has gone are listed as
  orphans, never deleted.
- **Case ids**: discovery's id for a scan; for an input discovery could not use, its path
  below the input root without suffix (`medseg.ingest.discover.case_id`). Paths built from a
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

from medseg.pipeline.folder import BatchReport, segment_cases, segment_folder, write_batch_manifest, write_batch_reports
from medseg.pipeline.output import (
    LOCK_FILE,
    OutputBusy,
    OutputUnwritable,
    check_disjoint,
    check_reads_outside,
    output_lock,
    prepare_output,
)
from medseg.pipeline.scan import (
    SKIP_REASON,
    CaseRecord,
    Job,
    coding_of,
    failure_reason,
    problem_record,
    segment_scan,
)

__all__ = [
    "BatchReport",
    "CaseRecord",
    "Job",
    "LOCK_FILE",
    "OutputBusy",
    "OutputUnwritable",
    "SKIP_REASON",
    "check_disjoint",
    "check_reads_outside",
    "coding_of",
    "failure_reason",
    "output_lock",
    "prepare_output",
    "problem_record",
    "segment_cases",
    "segment_folder",
    "segment_scan",
    "write_batch_manifest",
    "write_batch_reports",
]
