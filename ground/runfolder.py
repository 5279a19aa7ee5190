"""The run folder: one layout for every trainer, and the one place that writes and reads it.

    RUN/run.json             arguments, resolved settings, library versions       (trainer)
    RUN/metrics.jsonl        one JSON object per optimizer step: loss, lr, distances (trainer)
    RUN/checkpoint-N/        adapter files + trainer_state.json + accelerate state + samples/
    RUN/checkpoint-N/ema/    with --ema_decay: the averaged adapter (+ samples/); ema_state.safetensors beside it
    RUN/ema/                 with --ema_decay: the final averaged adapter (+ samples/)
    RUN/adapter_config.json, RUN/adapter.safetensors   the final adapter
    RUN/samples/             final samples (+ prompts.jsonl)
    RUN/eval.jsonl           one JSON object per scored checkpoint                  (eval)
    RUN/results.json         task results in the shape of peft's method comparison (language trainers)
    RUN/exit_status.json     {"code", "message"}: how the trainer ended, in its own words   (trainer)

Training, eval, the app and the benches all import these names and readers, so a run folder written by
any trainer is read the same way everywhere. Pure standard library: it sits at the bottom of the import
graph (app -> training/eval -> lowrank) so that every layer can use it.

Every file is written through `atomic_write` (a temporary name in the same folder, then os.replace):
a reader sees the old file or the whole new one, and a crash or a full disk leaves no partial file.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from .cli import CommandError

RUN_JSON = "run.json"
METRICS = "metrics.jsonl"
EVAL = "eval.jsonl"
RESULTS = "results.json"
EXIT_STATUS = "exit_status.json"
TRAINER_STATE = "trainer_state.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
SAMPLES = "samples"
PROMPTS = "prompts.jsonl"   # SAMPLES/prompts.jsonl: one row per sample image (image, prompt, seed)
SAMPLES_GRID = "samples_grid.png"   # the final samples in one picture (image trainers)
CONDITIONING_ENCODER = "conditioning_encoder.safetensors"   # semantic_map.py's map encoder, beside the adapter
EMA_DIR = "ema"   # RUN/ema/, RUN/checkpoint-N/ema/: the adapter's moving average (--ema_decay), an adapter folder
EMA_STATE = "ema_state.safetensors"   # checkpoint-N/ema_state.safetensors: the average in fp32, for resume
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class RunFolderError(CommandError, ValueError):
    """A run-folder file that exists but cannot be read as what it should be: one line, and (as bad input to
    a command) `error: ...` and exit status 2 wherever run_cli catches CommandError."""


class WriteError(OSError):
    """A file that could not be written (a full disk, no permission): the OSError's errno and reason, named
    by the file's own path, not its temporary name. str(): `cannot write PATH: reason`."""

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


# ----- atomic writes ---------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0o022)   # the only way to read it is to set it; put it back at once (at import, one thread)
    os.umask(mask)
    return mask


UMASK = _umask()


def public_dir(path: str | os.PathLike) -> Path:
    """Give a folder made by tempfile.mkdtemp (0700), and everything in it (safetensors writes files 0600), the
    modes of files and folders created the ordinary way, before it is renamed into place as an output."""
    for root, dirs, files in os.walk(path):
        os.chmod(root, 0o777 & ~UMASK)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~UMASK)
    return Path(path)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], parents: bool = False) -> Path:
    """write(tmp) into a temporary file next to `path`, then os.replace it into place; parents: create
    the missing folders above `path` first (an output named on a command line; never a run folder, which
    is gone for a reason when it is missing).

    The temporary name keeps the real suffix last (PIL and matplotlib pick the format from it) and the
    pid in it (two writers never share one). On any failure the temporary file is removed and the
    exception propagates, an OSError (ENOSPC) as a WriteError naming `path`: the old file, if any, is
    untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        if parents:
            path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        # the mode of a file created the ordinary way: some writers (safetensors) create 0600, which a UI
        # running as another user (ComfyUI, A1111, a web server) cannot read
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    except WriteError:
        raise
    except OSError as e:
        raise WriteError(e.errno, e.strerror or str(e), str(path)) from e
    finally:
        if os.path.lexists(tmp):
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


def write_json(path: str | os.PathLike, data, parents: bool = False) -> Path:
    """The one JSON writer of the product: NaN as null, keys sorted, two-space indent, atomic (above)."""
    text = json.dumps(clean_json(data), indent=2, sort_keys=True, default=str) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text), parents)


def write_text(path: str | os.PathLike, text: str, parents: bool = False) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text), parents)


def replace_dir(tmp: Path, final: Path) -> Path:
    """Move a fully written folder `tmp` to `final`, replacing an older `final`. The old one is renamed
    aside first and deleted after, so a kill at any moment leaves a complete folder under `final` or
    none (never a half-deleted one); `remove_stale` clears what a kill leaves aside."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    return final


def remove_dir(path: Path) -> None:
    """Delete a folder by renaming it aside first (a kill mid-delete never leaves half of it under a valid name)."""
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    os.rename(path, old)
    shutil.rmtree(old, ignore_errors=True)


def remove_stale(run_dir: str | os.PathLike) -> None:
    """Delete what a killed run leaves: half-written *.tmp folders and half-deleted *.old folders."""
    d = Path(run_dir)
    if d.is_dir():
        for p in d.iterdir():
            if p.is_dir() and p.name.endswith((".tmp", ".old")):
                shutil.rmtree(p, ignore_errors=True)


# ----- readers -----------------------------------------------------------------------------------------
def parse_jsonl(text: str, valid: Callable[[dict], bool] | None = None) -> tuple[list[dict], list[tuple[int, str]]]:
    """(rows, bad) of JSON-lines text: rows are the objects that parse (and pass `valid`), bad the
    (line number, line) of the others. Blank lines are neither."""
    rows, bad = [], []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and (valid is None or valid(row)):
            rows.append(row)
        else:
            bad.append((i, line))
    return rows, bad


def read_jsonl(path: str | os.PathLike, strict: bool = True, valid: Callable[[dict], bool] | None = None,
               expected: str = "a JSON object") -> list[dict]:
    """Rows of a JSON-lines file. strict: a malformed line is a RunFolderError naming it and `expected`;
    otherwise it is dropped (a killed writer's torn last line in metrics.jsonl)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise RunFolderError(f"cannot read {path}: {e.strerror or e}") from None
    rows, bad = parse_jsonl(text, valid)
    if strict and bad:
        i, line = bad[0]
        raise RunFolderError(f"{path} line {i} is not {expected}: {line[:80]!r}")
    return rows


def read_json(path: str | os.PathLike, default=None):
    """A JSON file's content, or `default` when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """Rows of RUN/metrics.jsonl that carry a step (a torn last line is dropped); [] when absent."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    return read_jsonl(path, strict=False, valid=lambda r: isinstance(r.get("step"), int))


def read_eval(run_dir: str | os.PathLike) -> list[dict]:
    """Rows of RUN/eval.jsonl sorted by step (rows without a step last); [] when absent."""
    path = Path(run_dir) / EVAL
    if not path.is_file():
        return []
    rows = read_jsonl(path, strict=False)
    return sorted(rows, key=lambda r: (not isinstance(r.get("step"), int), r.get("step") or 0))


def read_run(run_dir: str | os.PathLike) -> dict:
    """RUN/run.json as a dict; RunFolderError (one line) when the folder is not a run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunFolderError(f"run directory {run_dir} does not exist")
    path = run_dir / RUN_JSON
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunFolderError(f"{run_dir} is not a training run: it has no {RUN_JSON}") from None
    except (OSError, ValueError) as e:
        raise RunFolderError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise RunFolderError(f"{path} is not a JSON object")
    return data


def run_setting(run: dict, key: str, default=None):
    """A setting of a run: the value the trainer resolved (top level, then the adapter config), else
    the argument as given. Resolved first: args.learning_rate is None when the default was used."""
    for source in (run, run.get("adapter_config") or {}, run.get("args") or {}):
        if source.get(key) is not None:
            return source[key]
    return default


# ----- checkpoints ---------------------------------------------------------------------------------------
def is_adapter_dir(path: str | os.PathLike) -> bool:
    return all((Path(path) / f).is_file() for f in ADAPTER_FILES)


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """The one rule: checkpoint-N, a folder, with the adapter files and trainer_state.json. Trainers
    write a checkpoint as checkpoint-N.tmp and rename it last, so a complete name means complete files."""
    path = Path(path)
    return CHECKPOINT_RE.match(path.name) is not None and path.is_dir() and is_adapter_dir(path) \
        and (path / TRAINER_STATE).is_file()


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """RUN/checkpoint-N, the folder of the checkpoint saved after `step` optimizer steps (CHECKPOINT_RE)."""
    return Path(run_dir) / f"checkpoint-{step}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete RUN/checkpoint-N folders as (N, path), oldest first."""
    d = Path(run_dir)
    if not d.is_dir():
        return []
    found = [(int(CHECKPOINT_RE.match(p.name).group(1)), p) for p in d.iterdir() if is_complete_checkpoint(p)]
    return sorted(found)


def final_step(run_dir: str | os.PathLike, run: dict) -> int | None:
    """The step of the final adapter in RUN/: the last logged step, else the planned step count."""
    steps = [r["step"] for r in read_metrics(run_dir)]
    return max(steps) if steps else run_setting(run, "max_train_steps")
