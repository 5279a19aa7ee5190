"""What every eval command shares: the CLI error contract and RUN/eval.jsonl.

A trained run looks like RUN/run.json (arguments under "args", resolved values such as the learning
rate and the adapter config at the top level), RUN/metrics.jsonl (one row per step),
RUN/checkpoint-N/{adapter_config.json, adapter.safetensors, samples/}, the final adapter in RUN/,
and, once scored, RUN/eval.jsonl (one row per scored checkpoint, written by eval.subject and
eval.semantic_run through update_eval_file). Its files are read and written with ground.runfolder's
readers and atomic writers, directly: their RunFolderError (a bad file) and WriteError (a failed write)
are one `error:` line from run_main, like EvalError.
"""
from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from typing import Callable

from ground import cli, runfolder

from . import EvalError

logger = logging.getLogger("lowrank.eval")


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
    """Call main; bad input (EvalError, a run folder's RunFolderError: both CommandErrors) and a failed write
    (`cannot write PATH: reason`) become one `error: <message>` line and exit status 2, never a traceback."""
    setup_console()
    return cli.run_cli(main, argv, errors=(cli.CommandError, runfolder.WriteError))


# ----- RUN/eval.jsonl ------------------------------------------------------------------------------
def update_eval_file(run_dir: Path, row: dict, same_keys: tuple[str, ...]) -> None:
    """Add `row` to RUN/eval.jsonl, replacing an earlier row with the same values of `same_keys` (a rescore).
    File order: rows without a step first (a semantic-map run's real/base bounds), then by step."""
    path = Path(run_dir) / runfolder.EVAL
    rows = [r for r in (runfolder.read_jsonl(path, strict=False) if path.is_file() else [])
            if not all(r.get(k) == row.get(k) for k in same_keys)] + [row]
    rows.sort(key=lambda r: (isinstance(r.get("step"), int), r.get("step") or 0))
    runfolder.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
