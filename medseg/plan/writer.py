"""A plan as a YAML config a person reads and edits: each value under the comment that says why.

The text is written by hand around ``yaml.safe_dump`` of each value (flow style), because
PyYAML cannot emit comments; the result is an ordinary medseg config, checked by loading it
back with ``medseg.config.load_config`` before it is written.
"""

from __future__ import annotations

import datetime as _dt
import os
import textwrap
from pathlib import Path
from typing import Any

import yaml

from medseg.plan.planner import Plan
from medseg.plan.rules import Choice

__all__ = ["plan_yaml"]

WIDTH = 116


def _value(value: Any, folder: Path) -> str:
    """One value in YAML flow style; a path relative to the config's folder (as the loader resolves it)."""
    if isinstance(value, Path):
        value = os.path.relpath(value, folder)
    text = yaml.safe_dump([value], default_flow_style=True, width=10**6, sort_keys=False).strip()
    return text[1:-1]  # the one-element list's brackets


def _comment(text: str, indent: str) -> list[str]:
    return textwrap.wrap(text, WIDTH - len(indent), initial_indent=f"{indent}# ", subsequent_indent=f"{indent}#   ")


def _section(node: dict[str, Any], folder: Path, indent: str) -> list[str]:
    lines: list[str] = []
    for key, item in node.items():
        if isinstance(item, Choice):
            lines += _comment(item.rule, indent)
            lines.append(f"{indent}{key}: {_value(item.value, folder)}")
        else:
            lines.append(f"{indent}{key}:")
            lines += _section(item, folder, indent + "  ")
    return lines


def plan_yaml(plan: Plan, folder: Path, fingerprint_name: str, command: str = "medseg plan") -> str:
    """The plan as commented YAML for a file in ``folder`` (relative paths resolve against it)."""
    today = _dt.date.today().isoformat()
    header = [
        f"Planned by `{command}` on {today} from the dataset fingerprint {fingerprint_name} (beside this file).",
        "Each value below follows from the data by the rule in the comment above it (nnU-Net's rules where medseg "
        "has the same setting). Edit freely; `medseg config THIS_FILE` checks an edited file.",
    ]
    lines = [line for text in header for line in _comment(text, "")]
    lines.append("#")
    lines += [line for text in plan.summary for line in _comment(text, "")]
    if plan.notes:
        lines.append("#")
        lines += [line for text in plan.notes for line in _comment(f"NOTE: {text}", "")]
    body: list[str] = []
    for key, item in plan.sections.items():
        body.append("")
        body += _section({key: item}, folder, "")
    return "\n".join(lines + body) + "\n"
