"""The dataset fingerprint: what the training data are, measured once, so that the plan can follow from it.

Per case: grid (shape, spacing, orientation), modality from the headers, label voxel
counts, the objects of each class (connected components) and intensity statistics of
each channel inside the foreground, from a bounded random sample of voxels (nnU-Net
samples the foreground too: the background of a CT is air, of an MR noise, and neither
says how to normalise the tissue). Then the same pooled over cases. The cases come from
``medseg.data.datasets`` exactly as training reads them, so the plan describes what trains.
"""

from __future__ import annotations

import datetime as _dt
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from medseg.errors import ConfigError

__all__ = [
    "FINGERPRINT_FORMAT",
    "CaseFingerprint",
    "ClassStats",
    "Fingerprint",
    "IntensityStats",
    "fingerprint_cases",
    "measure_case",
]

log = logging.getLogger(__name__)

FINGERPRINT_FORMAT = "medseg-fingerprint/1"
# Foreground voxels sampled per case and channel for the intensity statistics: percentiles
# 0.5/99.5 of 10,000 values are within a few hundredths of a percent of the exact ones, and
# 1,000 cases still fit 40 MB.
SAMPLES_PER_CASE = 10_000
# More distinct label values than this is an instance map (one id per object), not classes.
MAX_LABEL_VALUES = 100


def _sig(value: float, digits: int = 6) -> float:
    return float(f"{float(value):.{digits}g}")


@dataclass
class IntensityStats:
    """Intensities of one channel inside the foreground (label != 0)."""

    mean: float
    std: float
    median: float
    p00_5: float
    p99_5: float
    min: float
    max: float
    samples: int

    @classmethod
    def of(cls, values: np.ndarray) -> IntensityStats:
        values = np.asarray(values, dtype=np.float64)
        if not values.size:
            return cls(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0)
        low, median, high = np.percentile(values, [0.5, 50.0, 99.5])
        return cls(
            _sig(values.mean()),
            _sig(values.std()),
            _sig(median),
            _sig(low),
            _sig(high),
            _sig(values.min()),
            _sig(values.max()),
            int(values.size),
        )


@dataclass
class CaseFingerprint:
    """One case as loaded for training: grid, modality, labels, objects and foreground intensities.

    ``shape``/``spacing`` are per spatial axis in the order the reader returns them (the
    affine's), ``orientation`` says where those axes point (``RAS``...; '' for 2D images).
    ``image_range`` is [min, max] of each channel over the whole image (background too).
    """

    id: str
    kind: str
    shape: list[int]
    spacing: list[float]
    spacing_known: bool
    orientation: str
    modality: list[str]
    label_voxels: dict[int, int]
    objects: dict[int, list[int]]  # per label value: [count, smallest, median, largest] in voxels
    intensity: list[IntensityStats]
    image_range: list[list[float]]

    @property
    def channels(self) -> int:
        return len(self.intensity)


@dataclass
class ClassStats:
    """One label value over the dataset: how much of it there is and how big its objects are."""

    value: int
    voxel_fraction: float  # of all labelled voxels
    cases: int  # cases holding it
    objects_per_case: float  # median over the cases holding it
    object_voxels: list[float]  # 5th, 50th, 95th percentile of object sizes, in voxels
    object_size: list[float]  # the same in mm^dims (mm^3 for volumes), or voxels when the spacing is unknown


@dataclass
class Fingerprint:
    """The whole dataset. Written to JSON beside the plan (``to_dict``/``from_dict`` round-trip)."""

    source: str
    cases: list[CaseFingerprint]
    modalities: list[str]  # per channel: the headers' (or the user's) modality, '' when unknown
    label_values: list[int]
    intensity: list[IntensityStats]  # per channel, pooled over the cases' foreground samples
    classes: list[ClassStats]
    unlabelled: list[str] = field(default_factory=list)  # case ids without a reference mask (not measured)
    created: str = ""
    medseg_version: str = ""

    @property
    def channels(self) -> int:
        return len(self.modalities)

    @property
    def spatial_dims(self) -> int:
        """3 when any case is a volume of more than one slice, else 2."""
        return 3 if any(len(c.shape) == 3 and min(c.shape) > 1 for c in self.cases) else 2

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for case in data["cases"]:
            case["label_voxels"] = {str(k): v for k, v in case["label_voxels"].items()}
            case["objects"] = {str(k): v for k, v in case["objects"].items()}
        return {"format": FINGERPRINT_FORMAT, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Fingerprint:
        if not isinstance(data, dict) or data.get("format") != FINGERPRINT_FORMAT:
            raise ConfigError(f"not a medseg fingerprint (expected format {FINGERPRINT_FORMAT!r})")
        cases = [
            CaseFingerprint(
                **{
                    **c,
                    "label_voxels": {int(k): int(v) for k, v in c["label_voxels"].items()},
                    "objects": {int(k): list(v) for k, v in c["objects"].items()},
                    "intensity": [IntensityStats(**s) for s in c["intensity"]],
                }
            )
            for c in data["cases"]
        ]
        return cls(
            source=data["source"],
            cases=cases,
            modalities=list(data["modalities"]),
            label_values=[int(v) for v in data["label_values"]],
            intensity=[IntensityStats(**s) for s in data["intensity"]],
            classes=[ClassStats(**c) for c in data["classes"]],
            unlabelled=list(data.get("unlabelled", [])),
            created=data.get("created", ""),
            medseg_version=data.get("medseg_version", ""),
        )


def measure_case(
    case_id: str,
    kind: str,
    image: np.ndarray,
    label: np.ndarray,
    spacing: Sequence[float],
    spacing_known: bool,
    orientation: str,
    modality: Sequence[str],
    rng: np.random.Generator,
    samples: int = SAMPLES_PER_CASE,
) -> tuple[CaseFingerprint, list[np.ndarray], dict[int, np.ndarray]]:
    """Fingerprint one case from its (C, *spatial) image and (*spatial) integer label.

    Returns the fingerprint, the foreground sample of each channel (for pooling) and the
    object sizes in voxels per label value (for the dataset's percentiles).
    """
    from scipy import ndimage

    values, counts = np.unique(label, return_counts=True)
    if values.size > MAX_LABEL_VALUES:
        raise ConfigError(
            f"case {case_id}: its mask holds {values.size} distinct values, more than the {MAX_LABEL_VALUES} "
            "classes medseg plans for; is it an instance map (one id per object)? Give one value per class"
        )
    foreground = label != 0
    where = np.flatnonzero(foreground)
    if where.size > samples:
        where = np.sort(rng.choice(where, size=samples, replace=False))
    flat = image.reshape(image.shape[0], -1)
    drawn = [np.asarray(flat[c, where], dtype=np.float64) for c in range(image.shape[0])]
    structure = ndimage.generate_binary_structure(label.ndim, label.ndim)  # touching diagonally is one object
    objects: dict[int, list[int]] = {}
    sizes: dict[int, np.ndarray] = {}
    for value in values.tolist():
        if value == 0:
            continue
        components, n = ndimage.label(label == value, structure=structure)
        found = np.bincount(components.ravel())[1:] if n else np.zeros(0, dtype=np.int64)
        sizes[int(value)] = found
        objects[int(value)] = [int(n), int(found.min()), int(np.median(found)), int(found.max())]
    fingerprint = CaseFingerprint(
        id=case_id,
        kind=kind,
        shape=[int(s) for s in label.shape],
        spacing=[_sig(s) for s in spacing],
        spacing_known=bool(spacing_known),
        orientation=orientation,
        modality=list(modality),
        label_voxels={int(v): int(n) for v, n in zip(values.tolist(), counts.tolist())},
        objects=objects,
        intensity=[IntensityStats.of(d) for d in drawn],
        image_range=[[_sig(flat[c].min()), _sig(flat[c].max())] for c in range(image.shape[0])],
    )
    return fingerprint, drawn, sizes


def _pool_classes(cases: Sequence[CaseFingerprint], sizes: Sequence[dict[int, np.ndarray]]) -> list[ClassStats]:
    total = sum(sum(c.label_voxels.values()) for c in cases) or 1
    values = sorted({v for c in cases for v in c.label_voxels})
    out = []
    for value in values:
        holding = [c for c in cases if c.label_voxels.get(value)]
        voxels = sum(c.label_voxels.get(value, 0) for c in cases)
        if value == 0:
            out.append(ClassStats(0, _sig(voxels / total), len(holding), 0.0, [], []))
            continue
        per_case = [(s.get(value, np.zeros(0)), float(np.prod(c.spacing))) for c, s in zip(cases, sizes)]
        found = np.concatenate([s for s, _ in per_case]) if per_case else np.zeros(0)
        physical = np.concatenate([s * v for s, v in per_case]) if per_case else np.zeros(0)
        percent = [5.0, 50.0, 95.0]
        out.append(
            ClassStats(
                value,
                _sig(voxels / total),
                len(holding),
                _sig(np.median([c.objects[value][0] for c in holding])) if holding else 0.0,
                [_sig(v) for v in np.percentile(found, percent)] if found.size else [],
                [_sig(v) for v in np.percentile(physical, percent)] if physical.size else [],
            )
        )
    return out


def _modalities(cases: Sequence[CaseFingerprint], given: Sequence[str] | None, channels: int) -> list[str]:
    """Per channel: the modality the user gave, else the most common one the headers name ('' if none)."""
    if given:
        if len(given) == 1:
            return [given[0].upper()] * channels
        if len(given) != channels:
            raise ConfigError(
                f"--modality names {len(given)} modalities but the images have {channels} channel(s); "
                "give one for all channels or one per channel (e.g. --modality CT or --modality MR,MR)"
            )
        return [m.upper() for m in given]
    found = []
    for channel in range(channels):
        named = Counter(c.modality[channel] for c in cases if c.modality[channel])
        found.append(named.most_common(1)[0][0] if named else "")
    return found


def fingerprint_cases(
    cases: Sequence[Any],
    source: str,
    color: str = "grey",
    modality: Sequence[str] | None = None,
    seed: int = 0,
    progress: bool | None = None,
) -> Fingerprint:
    """Load and measure every labelled case (``medseg.data.datasets.Case``) and pool the measurements.

    ``modality``: one modality for every channel or one per channel (NIfTI files name none).
    Raises ConfigError when no case has a label, or the cases disagree on channels.
    """
    import medseg
    from medseg.data.datasets import load_case

    labelled = [c for c in cases if c.label is not None]
    unlabelled = [c.id for c in cases if c.label is None]
    if not labelled:
        raise ConfigError(
            f"{source}: no case has a label; planning measures the reference masks, so pair each image with one"
        )
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    measured: list[CaseFingerprint] = []
    samples: list[list[np.ndarray]] = []
    sizes: list[dict[int, np.ndarray]] = []
    show = sys.stderr.isatty() if progress is None else progress
    every = max(1, len(labelled) // 10)  # without a terminal (a scheduler's log): a line every tenth of the cases
    for number, case in enumerate(tqdm(labelled, desc="fingerprint", unit="case", disable=not show), start=1):
        if not show and (number % every == 0 or number == len(labelled)):
            log.info("fingerprint: %d of %d cases", number, len(labelled))
        scan, label = load_case(case, color)
        geometry = scan.geometry
        if measured and scan.channels != measured[0].channels:
            raise ConfigError(
                f"{scan.ref.path}: case {case.id} has {scan.channels} channel(s) but case {measured[0].id} has "
                f"{measured[0].channels}; every case needs the same channels"
            )
        # The (first) image file's header names the modality of every channel; --modality can say otherwise.
        case_modality = [scan.modality] * scan.channels
        fp, drawn, found = measure_case(
            case.id,
            case.images[0].kind,
            scan.array,
            label.array[0],
            geometry.spacing,
            geometry.spacing_known,
            geometry.orientation if geometry.ndim == 3 else "",
            case_modality,
            rng,
        )
        measured.append(fp)
        samples.append(drawn)
        sizes.append(found)
    channels = measured[0].channels
    pooled = [IntensityStats.of(np.concatenate([s[c] for s in samples])) for c in range(channels)]
    return Fingerprint(
        source=source,
        cases=measured,
        modalities=_modalities(measured, modality, channels),
        label_values=sorted({v for c in measured for v in c.label_voxels}),
        intensity=pooled,
        classes=_pool_classes(measured, sizes),
        unlabelled=unlabelled,
        created=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        medseg_version=medseg.__version__,
    )
