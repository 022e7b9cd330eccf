"""Synthetic nuclei with true instance ids, written in the per-image layout of the Kaggle DSB 2018.

No real nuclei data is available to the tests or this project's machines, so this draws
fluorescence-like images that keep what makes touching nuclei hard: textured blobs of
varying size, shape and brightness, about a third of them in touching pairs whose shared
border is only a shallow intensity dip (each nucleus dims towards its rim), blurred by the
optics and noisy. It is a stand-in for testing and comparing methods, not a substitute for
real data: figures measured on it say how methods rank, not what they reach on real nuclei.

Arrays use medseg's (x, y) axis order, like ``medseg.data.phantoms``; the writers transpose
to the (row, column) order of image files.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = ["NucleiImage", "nuclei_image", "write_instance_case", "write_nuclei_dataset"]


@dataclass(frozen=True)
class NucleiImage:
    """A grey image in 0..1 and its instance map (ids 1..N, 0 background), both (x, y)."""

    image: np.ndarray
    instances: np.ndarray


@dataclass(frozen=True)
class _Nucleus:
    centre: tuple[float, float]
    radius: float  # mean radius in pixels
    axes: tuple[float, float]  # semi-axis scale factors (elongation), product 1
    angle: float
    harmonics: tuple[tuple[float, float], ...]  # (amplitude, phase) of boundary wobble, orders 2, 3, 4
    brightness: float

    def reach(self) -> float:
        return self.radius * max(self.axes) * 1.2


def _draw_nucleus(rng: np.random.Generator, centre: tuple[float, float], radius: float) -> _Nucleus:
    elongation = rng.uniform(1.0, 1.5)
    return _Nucleus(
        centre=centre,
        radius=radius,
        axes=(np.sqrt(elongation), 1.0 / np.sqrt(elongation)),
        angle=rng.uniform(0, np.pi),
        harmonics=tuple((rng.uniform(0.0, 0.07), rng.uniform(0, 2 * np.pi)) for _ in range(3)),
        brightness=rng.uniform(0.45, 1.0),
    )


def _placed(
    rng: np.random.Generator, shape: Sequence[int], nuclei: int, touching: float, radius: tuple[float, float]
) -> list[_Nucleus]:
    """Nuclei placed apart (a gap of at least 3 px), then partners placed against some of them."""
    mean = rng.uniform(*radius)
    sizes = lambda: float(np.clip(rng.normal(mean, 0.2 * mean), radius[0] * 0.7, radius[1] * 1.3))  # noqa: E731
    pairs = int(round(nuclei * touching / 2))
    singles = nuclei - 2 * pairs
    placed: list[_Nucleus] = []

    def free(candidate: _Nucleus, partner: _Nucleus | None) -> bool:
        x, y = candidate.centre
        margin = candidate.reach()
        if not (margin <= x < shape[0] - margin and margin <= y < shape[1] - margin):
            return False
        for other in placed:
            if other is partner:
                continue
            gap = np.hypot(x - other.centre[0], y - other.centre[1]) - candidate.reach() - other.reach()
            if gap < 3:
                return False
        return True

    anchors: list[_Nucleus] = []
    for wanted in range(pairs + singles):
        for _ in range(200):
            candidate = _draw_nucleus(rng, (rng.uniform(0, shape[0]), rng.uniform(0, shape[1])), sizes())
            if free(candidate, None):
                placed.append(candidate)
                if wanted < pairs:
                    anchors.append(candidate)
                break
    for anchor in anchors:
        for _ in range(200):
            candidate = _draw_nucleus(rng, (0.0, 0.0), sizes())
            phi = rng.uniform(0, 2 * np.pi)
            # Centres closer than the sum of their extents towards each other: the two overlap a
            # little and the shared pixels go to whichever nucleus they lie deeper in, which
            # leaves a curved common border.
            distance = (_extent(anchor, phi) + _extent(candidate, phi + np.pi)) * rng.uniform(0.8, 0.92)
            centre = (anchor.centre[0] + distance * np.cos(phi), anchor.centre[1] + distance * np.sin(phi))
            candidate = replace(candidate, centre=centre)
            if free(candidate, anchor):
                placed.append(candidate)
                break
    return placed


def _extent(nucleus: _Nucleus, direction: float) -> float:
    """Distance from the centre to the (smooth) ellipse boundary along ``direction`` (radians)."""
    psi = direction - nucleus.angle
    a, b = nucleus.radius * nucleus.axes[0], nucleus.radius * nucleus.axes[1]
    return float(1.0 / np.hypot(np.cos(psi) / a, np.sin(psi) / b))


def _depth(nucleus: _Nucleus, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """1 at the centre, 0 on the (wobbly) boundary, negative outside."""
    dx, dy = xs - nucleus.centre[0], ys - nucleus.centre[1]
    c, s = np.cos(nucleus.angle), np.sin(nucleus.angle)
    u, v = (c * dx + s * dy) / nucleus.axes[0], (-s * dx + c * dy) / nucleus.axes[1]
    rho = np.hypot(u, v) / nucleus.radius
    theta = np.arctan2(v, u)
    edge = 1.0 + sum(a * np.cos((k + 2) * theta + p) for k, (a, p) in enumerate(nucleus.harmonics))
    return 1.0 - rho / edge


def nuclei_image(
    shape: Sequence[int] = (256, 256),
    nuclei: int = 40,
    touching: float = 1 / 3,
    radius: tuple[float, float] = (5.0, 11.0),
    noise: float = 0.04,
    seed: int = 0,
) -> NucleiImage:
    """One synthetic fluorescence image of nuclei.

    nuclei: how many to place (fewer when the image has no room); touching: the fraction
    of them placed in touching pairs; radius: the range the image's mean nucleus radius is
    drawn from (each nucleus varies by 20% around it); noise: Gaussian noise sigma.
    """
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in shape)
    placed = _placed(rng, shape, nuclei, touching, radius)
    instances = np.zeros(shape, dtype=np.int32)
    best = np.zeros(shape, dtype=np.float64)  # depth of the nucleus a pixel belongs to
    intensity = np.zeros(shape, dtype=np.float64)
    texture = ndimage.gaussian_filter(rng.normal(size=shape), 1.5)
    texture /= texture.std() or 1.0
    for k, nucleus in enumerate(placed, start=1):
        reach = int(np.ceil(nucleus.reach())) + 1
        x0, y0 = (max(int(c) - reach, 0) for c in nucleus.centre)
        x1, y1 = (min(int(c) + reach + 1, n) for c, n in zip(nucleus.centre, shape))
        xs, ys = np.meshgrid(np.arange(x0, x1), np.arange(y0, y1), indexing="ij")
        depth = _depth(nucleus, xs, ys)
        window = (slice(x0, x1), slice(y0, y1))
        mine = (depth > 0) & (depth > best[window])
        instances[window][mine] = k
        best[window][mine] = depth[mine]
        # Dimmer towards the rim, so two touching nuclei meet in a shallow valley, not an edge.
        profile = 0.5 + 0.5 * np.clip(depth / 0.35, 0.0, 1.0) ** 0.7
        intensity[window][mine] = nucleus.brightness * profile[mine] * (1 + 0.18 * texture[window][mine])
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    illumination = 1.0 + 0.15 * (rng.uniform(-1, 1) * x + rng.uniform(-1, 1) * y)
    image = ndimage.gaussian_filter(intensity, 1.0) * illumination + 0.06
    image += ndimage.gaussian_filter(rng.normal(size=shape), 4.0) * 0.02  # uneven background
    image += rng.normal(0.0, noise, size=shape)
    return NucleiImage(np.clip(image, 0.0, 1.0).astype(np.float32), instances)


def write_instance_case(folder: Path, case: str, nuclei: NucleiImage) -> Path:
    """``folder/case/images/case.png`` (RGBA, as the DSB 2018 ships) and one 0/255 PNG per
    nucleus in ``folder/case/masks`` (``case-1.png``, ...); returns the case folder."""
    root = Path(folder) / case
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    grey = np.round(nuclei.image.T * 255).astype(np.uint8)
    rgba = np.stack([grey, grey, grey, np.full_like(grey, 255)], axis=-1)
    Image.fromarray(rgba, mode="RGBA").save(root / "images" / f"{case}.png")
    rows = nuclei.instances.T
    for k in range(1, int(rows.max()) + 1):
        mask = np.where(rows == k, 255, 0).astype(np.uint8)
        Image.fromarray(mask, mode="L").save(root / "masks" / f"{case}-{k}.png")
    return root


def write_nuclei_dataset(folder: Path, cases: int, seed: int = 0, **kwargs) -> dict[str, NucleiImage]:
    """``cases`` generated images in the per-image layout under ``folder``; returns them by case id."""
    made = {}
    for i in range(cases):
        case = f"nuclei_{seed:03d}_{i:03d}"
        made[case] = nuclei_image(seed=seed * 100003 + i, **kwargs)
        write_instance_case(folder, case, made[case])
    return made
