"""The Robustness tab: report folders written by `python -m eval.robustness` under the runs folder.

A report folder is any folder under runs_dir (one or two levels down) with a report.md; the tab shows its
Markdown (figures taken out: a Gallery shows the PNGs, since Markdown cannot reach files by relative path).
"""
from __future__ import annotations

import re
from pathlib import Path

REPORT = "report.md"
IMAGE_LINE = re.compile(r"^!\[[^\]]*\]\([^)]*\)\s*$")


def report_folders(runs_dir: Path) -> list[str]:
    """Report folders as paths relative to runs_dir, newest first."""
    runs_dir = Path(runs_dir)
    found = [p.parent for pattern in (f"*/{REPORT}", f"*/*/{REPORT}") for p in runs_dir.glob(pattern)]
    found.sort(key=lambda d: (d / REPORT).stat().st_mtime, reverse=True)
    return [str(d.relative_to(runs_dir)) for d in found]


def show(runs_dir: Path, name: str | None) -> tuple[str, list[str]]:
    """(report Markdown without its image lines, the PNG figures) of one report folder."""
    if not name:
        return "No robustness report yet: run `python -m eval.robustness --output_dir RUNS/robustness` " \
               "(RUNS = this app's runs folder).", []
    runs_dir = Path(runs_dir).resolve()
    folder = (runs_dir / name).resolve()
    if not folder.is_relative_to(runs_dir) or not (folder / REPORT).is_file():
        return f"{name} is not a robustness report folder under {runs_dir}.", []
    text = "\n".join(line for line in (folder / REPORT).read_text().splitlines() if not IMAGE_LINE.match(line))
    return text, [str(p) for p in sorted(folder.glob("*.png"))]
