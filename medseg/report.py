"""Tables and plots people read after a run."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["plot_learning_curves"]


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
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
