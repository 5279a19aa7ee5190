"""What every eval command shares: the CLI error contract, atomic writes, run folders.

A trained run looks like RUN/run.json (arguments under "args", resolved values such as the learning
rate and the adapter config at the top level), RUN/metrics.jsonl (one row per step),
RUN/checkpoint-N/{adapter_config.json, adapter.safetensors, samples/}, the final adapter in RUN/,
and, once scored, RUN/eval.jsonl (one row per scored checkpoint, written by eval.subject).
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Callable

from . import EvalError

logger = logging.getLogger("lowrank.eval")
ADAPTER_FILES = ("adapter_config.json", "adapter.safetensors")


# ----- the CLI contract --------------------------------------------------------------------------
class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (not the one at setup), so redirected stderr still sees it."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


class _Format(logging.Formatter):
    def format(self, record):
        return f"{record.levelname.lower()}: {record.getMessage()}"


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are EvalErrors: one `error:` line from run_main, not a usage dump."""

    def error(self, message: str):
        raise EvalError(f"{message} (see {self.prog} --help)")


def setup_console() -> None:
    """`warning: ...` lines on stderr; the libraries' load reports and download bars are silenced
    (they would bury the one line that matters)."""
    if not logger.handlers:
        handler = _Stderr()
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
    try:
        return main(argv)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


# ----- atomic files ------------------------------------------------------------------------------
def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """write(tmp) into a temporary file next to `path`, then os.replace: readers see the old file or
    the whole new one, and a crash leaves no partial output."""
    path = Path(path)
    # same folder (os.replace is atomic only within a filesystem); the real suffix last, because PIL
    # and matplotlib pick the file format from it
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise EvalError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def clean_json(value):
    """NaN/inf are not JSON: they become null (an absent class has no IoU, a missing score is unknown)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    return value


def write_json(path: str | Path, data) -> Path:
    text = json.dumps(clean_json(data), indent=2) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def read_jsonl(path: str | Path, strict: bool = True, valid: Callable[[dict], bool] | None = None,
               expected: str = "a JSON object") -> list[dict]:
    """Rows of a JSON-lines file. A row must be an object (and pass `valid`, if given). strict: a
    malformed line is an error naming it and `expected`; otherwise it is dropped (a killed writer's torn
    last line in metrics.jsonl)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise EvalError(f"cannot read {path}: {e.strerror or e}") from None
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not (isinstance(row, dict) and (valid is None or valid(row))):
            if strict:
                raise EvalError(f"{path} line {i} is not {expected}: {line[:80]!r}")
            continue
        rows.append(row)
    return rows


# ----- run folders -------------------------------------------------------------------------------
def read_run(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EvalError(f"run directory {run_dir} does not exist")
    path = run_dir / "run.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise EvalError(f"{run_dir} is not a training run: it has no run.json") from None
    except (OSError, ValueError) as e:
        raise EvalError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise EvalError(f"{path} is not a JSON object")
    return data


def run_setting(run: dict, key: str, default=None):
    """A setting of a run: the value the trainer resolved (top level, then the adapter config), else
    the argument as given. Resolved first: args.learning_rate is None when the default was used."""
    for source in (run, run.get("adapter_config") or {}, run.get("args") or {}):
        if source.get(key) is not None:
            return source[key]
    return default


def is_adapter_dir(path: Path) -> bool:
    return all((Path(path) / f).is_file() for f in ADAPTER_FILES)


def checkpoint_dirs(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete RUN/checkpoint-N folders (adapter written), sorted by N."""
    out = []
    for p in Path(run_dir).glob("checkpoint-*"):
        tail = p.name.split("-", 1)[1]
        if tail.isdigit() and p.is_dir() and is_adapter_dir(p):
            out.append((int(tail), p))
    return sorted(out)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return read_jsonl(path, strict=False) if path.is_file() else []


def final_step(run_dir: str | Path, run: dict) -> int | None:
    """The step of the final adapter in RUN/: the last logged step, else the planned step count."""
    steps = [r["step"] for r in read_metrics(run_dir) if isinstance(r.get("step"), int)]
    return max(steps) if steps else run_setting(run, "max_train_steps")
