"""The Robustness tab: report folders written by `python -m eval.robustness` under the runs folder, and the
studies committed with lowrank under results/ (so a fresh clone shows real results before any training).

A report folder is any folder under runs_dir (one or two levels down) with a report.md; a committed one is
named `results/<name>`. The tab shows its Markdown (figures taken out: a Gallery shows the PNGs, since
Markdown cannot reach files by relative path).
"""
from __future__ import annotations

import re
from pathlib import Path

REPORT = "report.md"
IMAGE_LINE = re.compile(r"^!\[[^\]]*\]\([^)]*\)\s*$")
RESULTS_DIR = Path(__file__).resolve().parent.parent / "results"   # the studies committed with lowrank
COMMITTED = "results/"


def report_folders(runs_dir: Path) -> list[str]:
    """Report folders as paths relative to runs_dir, newest first, then the committed ones (results/<name>)."""
    runs_dir = Path(runs_dir)
    found = [p.parent for pattern in (f"*/{REPORT}", f"*/*/{REPORT}") for p in runs_dir.glob(pattern)]
    found.sort(key=lambda d: (d / REPORT).stat().st_mtime, reverse=True)
    committed = sorted(p.parent.name for p in RESULTS_DIR.glob(f"*/{REPORT}"))
    return [str(d.relative_to(runs_dir)) for d in found] + [COMMITTED + name for name in committed]


def _folder(runs_dir: Path, name: str) -> Path | None:
    """The report folder `name` names, if it is one: under runs_dir, or a committed study; nothing else."""
    root, rel = (RESULTS_DIR, name[len(COMMITTED):]) if name.startswith(COMMITTED) else (Path(runs_dir), name)
    root = root.resolve()
    folder = (root / rel).resolve()
    return folder if folder.is_relative_to(root) and (folder / REPORT).is_file() else None


def show(runs_dir: Path, name: str | None) -> tuple[str, list[str]]:
    """(report Markdown without its image lines, the PNG figures) of one report folder."""
    if not name:
        return "No robustness report yet: run `python -m eval.robustness --output_dir RUNS/robustness` " \
               "(RUNS = this app's runs folder).", []
    folder = _folder(runs_dir, name)
    if folder is None:
        return f"{name} is not a robustness report folder under {Path(runs_dir).resolve()} or {RESULTS_DIR}.", []
    text = "\n".join(line for line in (folder / REPORT).read_text().splitlines() if not IMAGE_LINE.match(line))
    return text, [str(p) for p in sorted(folder.glob("*.png"))]
