"""Tables and plots people read after a run."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from medseg.files import atomic_path, atomic_write_bytes

__all__ = ["plot_dice_distribution", "plot_learning_curves"]


def plot_learning_curves(history: Sequence[Mapping[str, float]], path: Path) -> Path | None:
    """PNG of training loss and validation Dice per class against epoch."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [row["train_loss"] for row in history], label="training loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_yscale("log")
    ax_loss.legend()
    keys = sorted({k for row in history for k in row if k.startswith("dice_")})
    for key in keys:
        points = [(row["epoch"], row[key]) for row in history if key in row]
        ax_dice.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=key[5:])
    ax_dice.set_xlabel("epoch")
    ax_dice.set_ylabel("validation Dice")
    ax_dice.set_ylim(0, 1)
    if keys:
        ax_dice.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


def plot_dice_distribution(
    dice: Mapping[str, Sequence[float]],
    colours: Mapping[str, tuple[int, int, int]] | None = None,
    path: Path | None = None,
) -> bytes | None:
    """PNG (bytes, also written to ``path`` if given) of Dice per class: a box and every case as a dot.

    dice: class name → the Dice of each case (NaN, a class absent from both masks, left out).
    colours: class name → RGB 0-255 (classes without one are grey). None when nothing is scored.
    """
    import io

    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global backend state, safe in threads

    names = [name for name, values in dice.items() if any(np.isfinite(v) for v in values)]
    if not names:
        return None
    fig = Figure(figsize=(1.6 + 1.1 * len(names), 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    rng = np.random.default_rng(0)
    for i, name in enumerate(names, start=1):
        values = np.array([v for v in dice[name] if np.isfinite(v)], dtype=float)
        rgb = np.array((colours or {}).get(name, (128, 128, 128))) / 255.0
        ax.boxplot(values, positions=[i], widths=0.55, showfliers=False, medianprops={"color": "black"})
        ax.scatter(
            i + rng.uniform(-0.18, 0.18, len(values)),
            values,
            s=14,
            color=rgb,
            edgecolors="black",
            linewidths=0.4,
            zorder=3,
        )
    ax.set_xticks(range(1, len(names) + 1), [f"{n}\n(n={sum(np.isfinite(dice[n]))})" for n in names])
    ax.set_ylabel("Dice")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("Dice per class over the batch")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    data = buffer.getvalue()
    if path is not None:
        atomic_write_bytes(path, data)
    return data
