"""Values the `medseg` command needs while it builds its parser: choices, defaults, help texts.

Each is defined here once, in a module that imports only the standard library, so that
`medseg --help`, `--version` and `medseg COMMAND --help` answer without importing torch,
numpy or pydantic. The modules that use them (medseg.config, medseg.evaluation.evaluate, medseg.evaluation.grids,
medseg.review) import them from here and export them as before.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["CONVENTIONS", "DEFAULT_HOST", "PRECISIONS", "Precision", "RESAMPLE_MODES"]

# Arithmetic of the forward passes (config infer.precision, `medseg predict --precision`);
# medseg.device.choose_precision says what each means on a device.
Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)

# How medseg.evaluation.grids.align_to_reference may put a prediction on another grid onto its reference's
# grid (`medseg evaluate --resample`).
RESAMPLE_MODES = ("nearest",)

# How medseg.evaluation.evaluate scores empty classes; also the epilog of `medseg evaluate --help`.
CONVENTIONS = """\
Empty classes: a class absent from both prediction and reference scores NaN (Dice, IoU,
HD95, surface Dice) and is left out of the means; a class present in only one of them
scores Dice = IoU = surface Dice = 0 and HD95 = inf (a missed or invented structure is
the worst boundary error, and stays visible: the HD95 mean becomes inf, median and n
stay usable). metrics.json writes NaN as null and inf as "inf"."""

# Where the review server (medseg.review.ReviewServer, `medseg view`) listens by default: this machine only.
DEFAULT_HOST = "127.0.0.1"
