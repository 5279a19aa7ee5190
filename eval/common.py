"""What every eval command shares: the CLI error contract, atomic writes, run folders.

A trained run looks like RUN/run.json (arguments under "args", resolved values such as the learning
rate and the adapter config at the top level), RUN/metrics.jsonl (one row per step),
RUN/checkpoint-N/{adapter_config.json, adapter.safetensors, samples/}, the final adapter in RUN/,
and, once scored, RUN/eval.jsonl (one row per scored checkpoint, written by eval.subject and
eval.semantic_run through update_eval_file). The file names are lowrank.runfolder's.
"""
from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from typing import Callable

from lowrank import cli, runfolder

from . import EvalError

logger = logging.getLogger("lowrank.eval")
# run folders are read one way across the product: lowrank.runfolder's readers, under eval's names
ADAPTER_FILES, clean_json, final_step = runfolder.ADAPTER_FILES, runfolder.clean_json, runfolder.final_step
is_adapter_dir, read_metrics, run_setting = runfolder.is_adapter_dir, runfolder.read_metrics, runfolder.run_setting


# ----- the CLI contract --------------------------------------------------------------------------
class _Format(logging.Formatter):
    def format(self, record):
        return f"{record.levelname.lower()}: {record.getMessage()}"


class ArgumentParser(cli.ArgumentParser):
    """argparse whose errors are EvalErrors: one `error:` line from run_main, not a usage dump."""

    error_class = EvalError


def setup_console() -> None:
    """`warning: ...` lines on stderr; the libraries' load reports and download bars are silenced
    (they would bury the one line that matters)."""
    if not logger.handlers:
        handler = cli.StderrHandler()
        handler.setFormatter(_Format())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    for lib in ("transformers", "diffusers"):
        try:
            utils = importlib.import_module(f"{lib}.utils")
        except ImportError:
            continue
        utils.logging.set_verbosity_error()
        utils.logging.disable_progress_bar()


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Call main; EvalError becomes `error: <message>` and exit status 2, never a traceback."""
    setup_console()
    return cli.run_cli(main, argv, errors=(EvalError,))


# ----- atomic files: lowrank.runfolder's, with eval's one-line error -------------------------------------
def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """write(tmp) into a temporary file next to `path`, then rename (lowrank.runfolder.atomic_write);
    the parent folder is created, and a failure is one EvalError line."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return runfolder.atomic_write(path, write)
    except OSError as e:
        raise EvalError(f"cannot write {path}: {e.strerror or e}") from None


def write_json(path: str | Path, data) -> Path:
    text = json.dumps(clean_json(data), indent=2) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def read_jsonl(path: str | Path, strict: bool = True, valid: Callable[[dict], bool] | None = None,
               expected: str = "a JSON object") -> list[dict]:
    """lowrank.runfolder.read_jsonl with eval's error type."""
    try:
        return runfolder.read_jsonl(path, strict, valid, expected)
    except runfolder.RunFolderError as e:
        raise EvalError(str(e)) from None


# ----- run folders -------------------------------------------------------------------------------
def read_run(run_dir: str | Path) -> dict:
    try:
        return runfolder.read_run(run_dir)
    except runfolder.RunFolderError as e:
        raise EvalError(str(e)) from None


def update_eval_file(run_dir: Path, row: dict, same_keys: tuple[str, ...]) -> None:
    """Add `row` to RUN/eval.jsonl, replacing an earlier row with the same values of `same_keys` (a rescore).
    File order: rows without a step first (a semantic-map run's real/base bounds), then by step."""
    path = Path(run_dir) / runfolder.EVAL
    rows = [r for r in (read_jsonl(path, strict=False) if path.is_file() else [])
            if not all(r.get(k) == row.get(k) for k in same_keys)] + [row]
    rows.sort(key=lambda r: (isinstance(r.get("step"), int), r.get("step") or 0))
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def checkpoint_dirs(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete RUN/checkpoint-N folders, sorted by N (lowrank.runfolder's one rule)."""
    return runfolder.list_checkpoints(run_dir)
