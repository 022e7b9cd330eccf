"""Seconds per training step in fp32 and in bf16 autocast, for each ISBI model config.

One step is what `medseg train` does per batch: forward, Dice+CE loss, backward, Adam
update, on a batch of 4 random 256x256 patches in channels-last layout. fp32 and bf16
alternate round by round so both see the same machine load; the figure is the median.
`train.precision: auto` picks bf16 only on CPUs with native bf16 arithmetic.

    python bench/train_step.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medseg.config import load_config  # noqa: E402
from medseg.device import cpu_has_native_bf16  # noqa: E402
from medseg.models import build_model  # noqa: E402
from medseg.training.loop import Loss  # noqa: E402

CONFIGS = ("unet_em", "segnet_em", "fcn8s_em")


class Stepper:
    """One model, optimizer and batch for a config, built once; ``step()`` times one training step."""

    def __init__(self, config_name: str, dtype: torch.dtype | None, overrides: list[str]) -> None:
        config = load_config(REPO / "configs" / f"{config_name}.yaml", overrides)
        torch.manual_seed(0)
        self.dtype = dtype
        self.model = build_model(config.model).to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.loss_fn = Loss("dice_ce")
        size = config.train.patch_size
        self.images = torch.randn(config.train.batch_size, 1, *size).contiguous(memory_format=torch.channels_last)
        self.labels = (torch.rand(config.train.batch_size, 1, *size) > 0.5).float()
        for _ in range(2):  # oneDNN's kernel cache and Adam's state fill on the first steps
            self.step()

    def step(self) -> float:
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=self.dtype, enabled=self.dtype is not None):
            logits = self.model(self.images)
        self.loss_fn(logits, self.labels).backward()
        self.optimizer.step()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "train_step.json")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    cases = [(name, []) for name in CONFIGS] + [("unet_em", ["model.features=32"])]
    rows = []
    print(f"{'config':<24}{'fp32 s/step':>12}{'bf16 s/step':>12}{'speed-up':>10}")
    for name, overrides in cases:
        steppers = {"fp32": Stepper(name, None, overrides), "bf16": Stepper(name, torch.bfloat16, overrides)}
        fp32, bf16 = [], []
        for _ in range(args.rounds):  # interleaved
            fp32.append(steppers["fp32"].step())
            bf16.append(steppers["bf16"].step())
        row = {
            "config": name,
            "overrides": overrides,
            "fp32_seconds": round(statistics.median(fp32), 4),
            "bf16_seconds": round(statistics.median(bf16), 4),
        }
        row["speedup"] = round(row["fp32_seconds"] / row["bf16_seconds"], 2)
        rows.append(row)
        label = name + (" " + " ".join(overrides) if overrides else "")
        print(f"{label:<24}{row['fp32_seconds']:>12.3f}{row['bf16_seconds']:>12.3f}{row['speedup']:>9.2f}x", flush=True)
    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "native_bf16": cpu_has_native_bf16(),
        },
        "batch": "4 x 1 x 256 x 256, channels-last",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
