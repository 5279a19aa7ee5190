"""What the Robustness tab shows (no Gradio here): report folders written by `python -m eval.robustness`
under the runs folder, and the studies committed with lowrank under results/ (so a fresh clone shows real
results before any training).

A report folder is any folder under runs_dir (one or two levels down) with a report.md; a committed one is
named `results/<name>`. The tab shows its Markdown (figures taken out: they are shown as images, each at the
width of the page, since Markdown cannot reach files by relative path), with `*` and `_` outside code shown as
written: the report's formulas (‖W_merged − W_pre‖_F, mult_* |λ|) are text, not emphasis. Its title names the
study's task, read from the study command in its commands.txt (a language study is not DreamBooth), with the
task's one-line summary under it.

A study whose command is still running (its progress.json, eval/robustness_progress.py, not finished) is listed
too, before it has a report: the tab shows its runs (queued, running with their last logged step, ended) above
the report of an earlier command of the same study, if any, and re-reads it while it runs.
"""
from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path

from eval.robustness_progress import ENDED, PROGRESS, read_progress
from eval.robustness_tables import study_title, task_of_commands
from training.common.tasks import TASKS

from .runs import read_metrics  # incremental: a running run's metrics.jsonl is read from where it was left

REPORT = "report.md"
IMAGE_LINE = re.compile(r"^!\[[^\]]*\]\([^)]*\)\s*$")
RESULTS_DIR = Path(__file__).resolve().parent.parent / "results"   # the studies committed with lowrank
COMMITTED = "results/"
_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_EMPHASIS = re.compile(r"(?<![\\*])\*(?!\*)|(?<!\\)_")      # a lone * or any _ (not ** of bold, not escaped)


def _escape(part: str) -> str:
    return _EMPHASIS.sub(lambda m: "\\" + m.group(0), part)


def literal_markdown(text: str) -> str:
    """`text` with every * (except the ** of bold) and _ outside code spans and fenced blocks escaped, so
    Markdown shows them as written instead of turning them into italics."""
    out, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            parts = _CODE_SPAN.split(line)      # text, ticks, code, text, ticks, code, ..., text
            line = "".join(_escape(p) if i % 3 == 0 else (parts[i - 1] + p + parts[i - 1] if i % 3 == 2 else "")
                           for i, p in enumerate(parts))
        out.append(line)
    return "\n".join(out)


def report_folders(runs_dir: Path) -> list[str]:
    """Report folders (and studies still running, with no report yet) as paths relative to runs_dir, newest
    first, then the committed ones (results/<name>)."""
    runs_dir = Path(runs_dir)
    found = list(dict.fromkeys(p.parent for name in (REPORT, PROGRESS) for pattern in (f"*/{name}", f"*/*/{name}")
                               for p in runs_dir.glob(pattern)))
    found.sort(key=_last_written, reverse=True)
    committed = sorted(p.parent.name for p in RESULTS_DIR.glob(f"*/{REPORT}"))
    return [str(d.relative_to(runs_dir)) for d in found] + [COMMITTED + name for name in committed]


def _last_written(folder: Path) -> float:
    return max(p.stat().st_mtime for p in (folder / REPORT, folder / PROGRESS) if p.is_file())


def _folder(runs_dir: Path, name: str) -> Path | None:
    """The report folder `name` names, if it is one: under runs_dir, or a committed study; nothing else."""
    root, rel = (RESULTS_DIR, name[len(COMMITTED):]) if name.startswith(COMMITTED) else (Path(runs_dir), name)
    root = root.resolve()
    folder = (root / rel).resolve()
    inside = folder.is_relative_to(root)
    return folder if inside and ((folder / REPORT).is_file() or (folder / PROGRESS).is_file()) else None


def running(folder: Path) -> dict | None:
    """The study's progress while its command runs; None once it finished (or it never wrote one)."""
    progress = read_progress(folder)
    return progress if progress is not None and not progress.get("finished") else None


def is_running(runs_dir: Path, name: str | None) -> bool:
    """Whether the folder `name` names holds a study whose command is still running (the tab re-reads it)."""
    folder = _folder(runs_dir, name) if name else None
    return folder is not None and running(folder) is not None


def _alive(progress: dict) -> bool:
    """False when the study's command is known to be gone (this host, no such process); True when unknown."""
    if progress.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(progress.get("pid", 0)), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def _last_step(run_dir: Path) -> str:
    steps = [m["step"] for m in read_metrics(run_dir) if isinstance(m.get("step"), int)] if run_dir.is_dir() else []
    return str(steps[-1]) if steps else "–"


def progress_markdown(folder: Path, progress: dict) -> str:
    """A running study: one line of counts and a table of its runs (a running run with its last logged step)."""
    runs, counts = progress["runs"], progress.get("counts", {})
    ended = sum(counts.get(s, 0) for s in ENDED)
    ago = max(0, int(time.time() - float(progress.get("updated", time.time()))))
    where = f"`--launcher {progress.get('launcher', 'local')}` on {progress.get('host', '?')}"
    state = f"**Running** ({where}, updated {ago} s ago)" if _alive(progress) else (
        f"**Stopped**: its command ({where}) is no longer running; run it again to go on (finished runs are kept, "
        f"interrupted ones resume from their latest checkpoint)")
    lines = [f"{state}: {ended} of {progress.get('total', len(runs))} runs ended ({counts.get('trained', 0)} "
             f"trained, {counts.get('reused', 0)} reused, {counts.get('failed', 0)} failed); "
             f"{counts.get('running', 0)} running, {counts.get('queued', 0)} queued.", "",
             "| run | state | length | last step |", "|---|---|---|---|"]
    for name, run in runs.items():
        step = _last_step(folder / "runs" / name) if run.get("state") == "running" else ""
        error = f" ({run['error']})".replace("|", "\\|") if run.get("error") else ""
        lines.append(f"| `{name}` | {run.get('state', '?')}{error} | {run.get('length', '')} | {step} |")
    return literal_markdown("\n".join(lines))   # an error line's --flag_names are text, not emphasis


def name_the_task(folder: Path, text: str) -> str:
    """The report's Markdown with a title that names the study's task and a line with the task's summary, from
    the study command in FOLDER/commands.txt; as it is when there is none."""
    study = task_of_commands(folder)
    if study is None:
        return text
    lines = text.splitlines()
    body = lines[1:] if lines and lines[0].startswith("# ") else lines
    return "\n".join([study_title(*study), "", f"Task: {TASKS[study[0]].summary}.", *body])


def show(runs_dir: Path, name: str | None) -> tuple[str, list[str]]:
    """(report Markdown without its image lines, shown literally; the PNG figures) of one report folder. With
    no folder chosen it says whether there are reports to choose from (never "none yet" beside a list)."""
    if not name:
        found = report_folders(runs_dir)
        if found:
            return f"Choose a report folder above ({len(found)} found).", []
        return (f"No robustness report yet: run `python -m eval.robustness` (it writes "
                f"`outputs/robustness-<task>/`; this app lists report folders under {Path(runs_dir).resolve()}).", [])
    folder = _folder(runs_dir, name)
    if folder is None:
        return f"{name} is not a robustness report folder under {Path(runs_dir).resolve()} or {RESULTS_DIR}.", []
    progress = running(folder)
    if not (folder / REPORT).is_file():   # running (or just ended, its report being written), no report yet
        progress = read_progress(folder)
        body = progress_markdown(folder, progress) if progress else "Its progress.json cannot be read."
        return f"# Robustness study: {folder.name}\n\n{body}", []
    text = "\n".join(line for line in (folder / REPORT).read_text().splitlines() if not IMAGE_LINE.match(line))
    text = literal_markdown(name_the_task(folder, text))
    if progress is not None:   # the report of an earlier command, under what this one is doing
        title, _, rest = text.partition("\n")
        text = (f"{title}\n\n{progress_markdown(folder, progress)}\n\nThe report below is from an earlier command "
                f"of this study; this one rewrites it when its runs end.\n{rest}")
    return text, [str(p) for p in sorted(folder.glob("*.png"))]


def split_report(text: str) -> tuple[str, str]:
    """(the report's title and first paragraphs, its `## ` sections): the tab shows the figures between them."""
    at = next((m.start() for m in re.finditer(r"^## ", text, flags=re.M)), len(text))
    return text[:at].rstrip("\n"), text[at:]


def refresh(runs_dir: Path, current: str | None) -> tuple[list[str], str | None, str, list[str]]:
    """(choices, the folder to show, its text, its figures): the current folder while it is still offered,
    else the newest one, so the dropdown and the text always agree."""
    found = report_folders(runs_dir)
    value = current if current in found else (found[0] if found else None)
    return (found, value, *show(runs_dir, value))
