"""The shape of the code base, checked: what may import what, how big a module may grow, no copied blocks.

Why a test: the layering (Prefect wiring on top, imaging in medseg, one per-scan path) and
the small-modules rule erode one convenient import or one pasted helper at a time; a test
says so in the commit that does it, naming the file and the line.
"""

from __future__ import annotations

import ast
import hashlib
import re
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGING = ("numpy", "torch", "monai", "nibabel", "pydicom", "highdicom", "SimpleITK", "tifffile", "skimage", "PIL")
MAX_MODULE_LINES = 450
BLOCK = 11  # a copied block is more than 10 significant lines


def _modules(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in ``path``, at any depth (imports inside functions count too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def test_prefect_code_imports_no_imaging_library() -> None:
    """flows/ only orchestrates: every array, tensor and DICOM tag is handled inside medseg."""
    offenders = [
        f"{path.relative_to(REPO)}:{line} imports {name}"
        for path in _modules("flows")
        for line, name in _imports(path)
        if name.split(".")[0] in IMAGING
    ]
    assert not offenders, "move this work into medseg and call it from the flow:\n" + "\n".join(offenders)


def test_only_the_cli_entry_points_reach_the_prefect_code() -> None:
    """medseg runs without Prefect: only `medseg serve`, `medseg status` and the demo start a flow."""
    allowed = {"medseg/cli/serve.py", "medseg/cli/status.py", "medseg/cli/demo.py", "medseg/demo.py"}
    offenders = [
        f"{path.relative_to(REPO)}:{line} imports {name}"
        for path in _modules("medseg")
        for line, name in _imports(path)
        if name.split(".")[0] in ("medseg_flows", "prefect", "prefect_dask")
        and str(path.relative_to(REPO)) not in allowed
    ]
    assert not offenders, "\n".join(offenders)


def test_the_prefect_code_is_imported_by_its_installed_name() -> None:
    """flows/ installs as medseg_flows (pyproject's package-dir): `import flows` works only where the repository
    root is on sys.path, and elsewhere finds another distribution's `flows` or nothing. Code in strings that tests
    run in a subprocess counts too, so the check reads text, not the syntax tree."""
    bare = re.compile(r"^[ \t]*(?:from|import)[ \t]+flows\b", re.MULTILINE)
    offenders = []
    for path in _modules("medseg", "flows", "tests", "bench"):
        text = path.read_text(encoding="utf-8")
        offenders += [f"{path.relative_to(REPO)}:{text.count(chr(10), 0, m.start()) + 1}" for m in bare.finditer(text)]
    assert not offenders, "import medseg_flows (the installed name), not flows:\n" + "\n".join(offenders)


def test_no_module_is_over_the_line_limit() -> None:
    sizes = {p: len(p.read_text(encoding="utf-8").splitlines()) for p in _modules("medseg", "flows")}
    big = [f"{p.relative_to(REPO)}: {n} lines" for p, n in sizes.items() if n > MAX_MODULE_LINES]
    assert not big, f"split by job (limit {MAX_MODULE_LINES} lines):\n" + "\n".join(big)


def _significant_lines(path: Path) -> list[tuple[int, str]]:
    """Code lines without blanks, comments and docstrings, whitespace-normalised, with their numbers."""
    text = path.read_text(encoding="utf-8")
    docstrings = set()
    for node in ast.walk(ast.parse(text)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    lines = []
    for number, line in enumerate(text.splitlines(), start=1):
        code = " ".join(line.split())
        if code and not code.startswith("#") and number not in docstrings:
            lines.append((number, code))
    return lines


def test_no_block_of_more_than_ten_lines_is_copied_outside_tests() -> None:
    """One way to do each job: a block that appears twice is a helper waiting to be written."""
    seen: dict[str, list[str]] = defaultdict(list)
    for path in _modules("medseg", "flows"):
        lines = _significant_lines(path)
        for i in range(len(lines) - BLOCK + 1):
            window = lines[i : i + BLOCK]
            if sum(len(code) > 12 for _, code in window) < BLOCK - 2:  # mostly brackets and short tokens
                continue
            digest = hashlib.sha1("\n".join(code for _, code in window).encode()).hexdigest()
            seen[digest].append(f"{path.relative_to(REPO)}:{window[0][0]}")
    copies = sorted({" and ".join(places) for places in seen.values() if len(places) > 1})
    assert not copies, "the same block stands in two places:\n" + "\n".join(copies)
