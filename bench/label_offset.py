"""Where the ISBI 2012 membrane labels sit against the image's dark membrane pixels.

Mirroring EM training samples costs pixel error (BENCHMARKS.md), more up-down than
left-right. One cause a model cannot learn around: labels drawn a fraction of a pixel off
the membranes in a fixed direction. A mirror turns that offset around, so mirrored and
unmirrored samples disagree. This measures the offset per axis: the Pearson correlation
between the membrane labels, moved by whole pixels, and the image's darkness, pooled over
all 30 training slices, with the peak placed between whole shifts by a parabola through
the best shift and its two neighbours (integer shifts only, so no interpolation smooths
one shift more than another). Prints the figures and writes JSON.

    python bench/label_offset.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medseg.config import DataConfig  # noqa: E402
from medseg.data.datasets import find_cases  # noqa: E402
from medseg.ingest import load  # noqa: E402
from medseg.evaluation.alignment import parabolic_peak, shifted_correlation  # noqa: E402
from medseg.ingest.labels import load_label  # noqa: E402

SHIFTS = range(-3, 4)
MARGIN = max(abs(s) for s in SHIFTS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "label_offset.json")
    args = parser.parse_args()
    cases = [c for c in find_cases(DataConfig(dataset="isbi2012_em", classes={"membrane": 0, "cell": 255})) if c.label]
    pairs = []
    for case in cases:
        scan = load(case.images[0])
        image = scan.array[0].astype(np.float64)
        label = load_label(case.label, scan, [0, 255]).array[0]
        pairs.append(((image.mean() - image) / image.std(), (label == 0).astype(np.float64)))
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "slices": len(pairs), "axes": {}}
    for axis, name in ((0, "x (left-right)"), (1, "y (up-down)")):
        values = [float(np.mean([shifted_correlation(d, m, axis, s, MARGIN) for d, m in pairs])) for s in SHIFTS]
        peak = parabolic_peak(list(SHIFTS), values)
        report["axes"][name] = {
            "shifts": list(SHIFTS),
            "correlation": [round(v, 5) for v in values],
            "peak_shift_px": round(peak, 3),
        }
        print(
            f"{name:<16} correlation by shift {dict(zip(SHIFTS, (round(v, 4) for v in values)))}  "
            f"peak at {peak:+.2f} px"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
