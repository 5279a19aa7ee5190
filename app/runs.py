"""The run registry: every run is a folder under the runs dir, and everything the app knows about it
is read back from files there, so runs survive a restart of the app.

    RUNS/<name>/app.json           what the app asked for (method, rank, steps, model, owner process)
    RUNS/<name>/instance_images/   the uploaded subject, re-encoded as PNG under sanitised names
    RUNS/<name>/pid                {"pid", "start"} of the training process while/after it runs
    RUNS/<name>/exit_code          {"returncode", "cancelled"} once the process has ended (the launcher's)
    RUNS/<name>/exit_status.json   {"code", "message"}: the trainer's own; read before exit_code, whose
                                   returncode is accelerate's (1 for any failure)
    RUNS/<name>/train.log          the trainer's stdout and stderr
    RUNS/<name>/run.json, metrics.jsonl, checkpoint-N/, adapter.safetensors, eval.jsonl  (the trainer, eval/)

A robustness study (`python -m eval.robustness`) keeps its runs under its own folder, RUNS/<study>/runs/<run>/,
and a language trainer given several seeds (`--seeds`) one run per seed, RUNS/<group>/seed-N/: they are listed
too, named `<study>/runs/<run>` and `<group>/seed-N`, grouped by folder after the app's and the CLI's own runs.

Status: queued -> running -> finished | failed | cancelled. A pid file whose process is gone with no
exit_code file means the process died (app killed, OOM...): the run shows as failed with its last log
lines, unless its final adapter is there (it finished while nobody was watching).
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from ground import runfolder
from ground.cli import error_line

from . import cache

# run folders are read one way across the product: ground.runfolder's readers, under the app's names
ADAPTER_FILES, is_adapter_dir, read_json = runfolder.ADAPTER_FILES, runfolder.is_adapter_dir, runfolder.read_json
checkpoints, read_eval, write_json = runfolder.list_checkpoints, runfolder.read_eval, runfolder.write_json

APP_JSON, PID_FILE, EXIT_FILE, LOG_FILE = "app.json", "pid", "exit_code", "train.log"
EVAL_LOG, REPORT_LOG = "eval.log", "report.log"   # the app's scoring job (in RUN/), report job (its folder)
EVAL_EMA_LOG = "eval-ema.log"                      # the scoring of a run's moving average (eval.subject --average)
SUMMARY_KEYS = ("step", "loss", "lr", "distance_fig3", "distance_mean", "distance_max",
                "rel_distance_fig3", "rel_distance_mean", "rel_distance_max",
                "val_loss", "tune/score")   # held-out measures: curves and eval.best's best step read them
_GROWING = (runfolder.METRICS, runfolder.EVAL, LOG_FILE)   # files written in place: their own stamps count
STUDY_RUNS = "runs"          # eval.robustness: OUTPUT_DIR/runs/<run>
_SEED_RE = re.compile(r"^seed-[0-9]{1,12}$")   # glue.py/instruct.py --seeds: OUTPUT_DIR/seed-N
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


# ----- small file helpers -------------------------------------------------------------------------
def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), None if gone.
    Recorded with the pid so a recycled pid is never taken for our process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()   # after "pid (comm) "
    if fields[0] in ("Z", "X"):                     # zombie / dead: exited, not yet reaped
        return None
    return int(fields[19])


def alive(pid: int | None, start: int | None) -> bool:
    if not pid or pid <= 0:
        return False
    if Path("/proc").is_dir():
        now = process_start(pid)
        return now is not None and (start is None or now == start)
    try:                                            # no /proc (macOS): best effort
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def owner_record() -> dict:
    """Identifies this app process (written into app.json of the runs it queues)."""
    return {"pid": os.getpid(), "start": process_start(os.getpid())}


def write_pid(run_dir: Path, pid: int) -> None:
    runfolder.write_json(Path(run_dir) / PID_FILE, {"pid": pid, "start": process_start(pid), "time": time.time()})


def write_exit(run_dir: Path, returncode: int | None, cancelled: bool = False, note: str = "") -> None:
    runfolder.write_json(Path(run_dir) / EXIT_FILE, {"returncode": returncode, "cancelled": cancelled,
                                                      "note": note, "time": time.time()})


def last_log_lines(run_dir: Path, n: int = 15, name: str = LOG_FILE) -> list[str]:
    """The last n meaningful lines of a log (tqdm's carriage-return redraws and ANSI colours removed)."""
    path = Path(run_dir) / name
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 65536))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    lines = []
    for line in text.split("\n"):
        parts = [x for x in line.split("\r") if x.strip()]   # tqdm redraws: keep the last state
        line = _ANSI_RE.sub("", parts[-1] if parts else "").rstrip()
        if line:
            lines.append(line)
    return lines[-n:]


# ----- metrics.jsonl: read incrementally, keep the summary keys only -----------------------------
_METRICS_LOCK = threading.Lock()


def _read_new_metrics(path: Path) -> list[dict]:
    """metrics.jsonl grows by one line per step and a full-probe line carries a distance per layer (hundreds
    of keys on SD-1.5): parse only the bytes added since the last read and keep SUMMARY_KEYS. The state
    (inode, mtime_ns, offset, rows) lives in the bounded app.cache.METRICS."""
    key = str(path)
    try:
        st = path.stat()
    except OSError:
        return []
    with _METRICS_LOCK:
        ino, mtime, offset, rows = cache.METRICS.get(key) or (st.st_ino, st.st_mtime_ns, 0, [])
        if ino != st.st_ino or st.st_size < offset or (st.st_size == offset and mtime != st.st_mtime_ns):
            offset, rows = 0, []                            # replaced, truncated or rewritten: start over
        if st.st_size > offset:
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read(st.st_size - offset)
            end = chunk.rfind(b"\n") + 1                    # a half-written last line waits
            rows = rows + _parse_lines(chunk[:end])
            offset += end
        cache.METRICS.put(key, (st.st_ino, st.st_mtime_ns, offset, rows))
        return list(rows)


def _parse_lines(data: bytes) -> list[dict]:
    rows, _ = runfolder.parse_jsonl(data.decode("utf-8", "replace"), valid=lambda r: isinstance(r.get("step"), int))
    return [{k: row[k] for k in SUMMARY_KEYS if k in row} for row in rows]


def read_metrics(run_dir: Path) -> list[dict]:
    return _read_new_metrics(Path(run_dir) / runfolder.METRICS)


# ----- checkpoints and samples -------------------------------------------------------------------
def samples(folder: Path) -> list[tuple[Path, str]]:
    """(image, prompt) pairs of folder/samples, in prompts.jsonl order (else sorted PNGs)."""
    sdir = Path(folder) / runfolder.SAMPLES
    out = []
    try:
        lines = (sdir / runfolder.PROMPTS).read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            row = json.loads(line)
            img = sdir / Path(str(row["image"])).name        # never follow a path out of the folder
        except (ValueError, KeyError, TypeError):
            continue
        if img.is_file():
            out.append((img, str(row.get("prompt", ""))))
    if not out and sdir.is_dir():
        out = [(p, "") for p in sorted(sdir.glob("*.png"))]
    return out


# ----- the registry -------------------------------------------------------------------------------
@dataclass
class RunInfo:
    name: str
    path: Path
    status: str
    method: str = "?"
    rank: int | None = None
    learning_rate: float | None = None
    total_steps: int | None = None
    step: int = 0
    loss: float | None = None
    model: str = "tiny"
    created: float = 0.0
    checkpoints: list[int] = field(default_factory=list)
    has_final: bool = False
    scored: bool = False
    detail: str = ""                      # why it failed / was cancelled, for the UI
    log_tail: list[str] = field(default_factory=list)

    @property
    def study(self) -> str:
        """The folder grouping the run: its robustness study or multi-seed run ('' for a run of its own)."""
        return self.name.split("/", 1)[0] if "/" in self.name else ""

    @property
    def label(self) -> str:
        return f"{self.name} [{self.status}]"


def valid_name(name: str) -> bool:
    """A run folder name, a study's run `<study>/runs/<run>` or one seed's run `<group>/seed-N`: nothing else
    can reach outside the runs dir."""
    parts = str(name or "").split("/")
    if len(parts) == 3 and parts[1] == STUDY_RUNS:
        parts = [parts[0], parts[2]]
    elif len(parts) > 1 and not (len(parts) == 2 and _SEED_RE.match(parts[1])):
        return False
    return all(_NAME_RE.match(p) and ".." not in p for p in parts)


def run_path(runs_dir: Path, name: str) -> Path:
    """RUNS/name for a name typed or chosen in the UI; ValueError for anything that is not a plain
    run folder name (no separators, no '..'), a study's `<study>/runs/<run>` or a `<group>/seed-N`, so no
    UI value can point outside the runs dir."""
    name = run_name(name)                                 # accept a RunInfo.label too
    if not valid_name(name):
        raise ValueError(f"not a run name: {name!r}")
    path = Path(runs_dir) / name
    if not path.is_dir():
        raise ValueError(f"no run named {name!r} in {runs_dir}")
    return path


def status(run_dir: Path) -> tuple[str, str]:
    """(status, detail) from the files alone; see the module docstring."""
    run_dir = Path(run_dir)
    ex = read_json(run_dir / EXIT_FILE)
    if isinstance(ex, dict):
        if ex.get("cancelled"):
            return "cancelled", ex.get("note") or "cancelled by the user"
        # the trainer's own word first: `accelerate launch` turns every failure into its own exit code 1
        own = read_json(run_dir / runfolder.EXIT_STATUS)
        if isinstance(own, dict) and isinstance(own.get("code"), int):
            if own["code"] == 0:
                return "finished", ""
            return "failed", f"the trainer reported code {own['code']}: {own.get('message') or 'no message'}"
        rc = ex.get("returncode")
        if rc == 0:
            return "finished", ""
        return "failed", ex.get("note") or f"the trainer exited with code {rc}"
    pid = read_json(run_dir / PID_FILE)
    if isinstance(pid, dict):
        if alive(pid.get("pid"), pid.get("start")):
            return "running", ""
        if is_adapter_dir(run_dir):
            return "finished", ""
        return "failed", "the training process died without reporting an exit code (killed, or the app stopped)"
    app = read_json(run_dir / APP_JSON)
    if isinstance(app, dict):
        owner = app.get("owner") or {}
        if alive(owner.get("pid"), owner.get("start")):
            return "queued", ""
        return "failed", "never started: the app that queued it stopped first"
    if is_adapter_dir(run_dir):
        return "finished", ""
    return "incomplete", "no final adapter (a run made outside the app, or still writing)"


def run_name(name: str) -> str:
    """The run name a UI value (a name or a RunInfo.label) stands for."""
    name = str(name or "").strip()
    return name.split(" [", 1)[0] if " [" in name else name


def find(runs_dir: Path, name: str) -> RunInfo:
    """RunInfo of the run a UI value names (ValueError as run_path), under the name the registry lists it."""
    return info(run_path(runs_dir, name), name=run_name(name))


def info(run_dir: Path, name: str | None = None) -> RunInfo:
    """What the app knows about a run, listed as `name` (default: the folder's name); cached on the folder's
    stamps (see app.cache) unless it is queued or running. A copy: callers may change it."""
    run_dir = Path(run_dir)
    got = cache.file_memo(cache.RUN_INFO, [run_dir, *(run_dir / f for f in _GROWING)], lambda: _info(run_dir),
                          store=lambda ri: ri.status not in ("queued", "running"))
    return replace(got, name=name or got.name, checkpoints=list(got.checkpoints), log_tail=list(got.log_tail))


def _info(run_dir: Path) -> RunInfo:
    app = read_json(run_dir / APP_JSON, {}) or {}
    top = read_json(run_dir / runfolder.RUN_JSON, {}) or {}
    top = top if isinstance(top, dict) else {}
    args = top.get("args") if isinstance(top.get("args"), dict) else {}
    # what the trainer resolved: a CLI run given no --rank/--method still has them in its adapter config
    cfg = top.get("adapter_config") if isinstance(top.get("adapter_config"), dict) else {}
    st, detail = status(run_dir)
    rows = read_metrics(run_dir)
    last = rows[-1] if rows else {}

    def pick(key, *alts):
        for k in (key, *alts):
            for src in (app, top, args, cfg):
                if src.get(k) is not None:
                    return src[k]
        return None

    ri = RunInfo(name=run_dir.name, path=run_dir, status=st, detail=detail,
                 method=str(pick("method") or "?"), rank=pick("rank"), learning_rate=pick("learning_rate"),
                 total_steps=pick("max_train_steps"), step=int(last.get("step") or 0), loss=last.get("loss"),
                 model=str(pick("pretrained_model_name_or_path", "model") or "tiny"),
                 created=float(app.get("created") or _mtime(run_dir)),
                 checkpoints=[s for s, _ in checkpoints(run_dir)], has_final=is_adapter_dir(run_dir),
                 scored=(run_dir / runfolder.EVAL).is_file())
    if st in ("failed", "cancelled"):
        ri.log_tail = last_log_lines(run_dir)
        if st == "failed" and ri.log_tail and "exited with code" in detail:
            ri.detail = f"{detail}: {error_line(ri.log_tail)}"
    return ri


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _is_run(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in (APP_JSON, runfolder.RUN_JSON, runfolder.METRICS))


def list_runs(runs_dir: Path) -> list[RunInfo]:
    """Every run folder (one with app.json, run.json or metrics.jsonl), newest first; then the runs of each
    robustness study (RUNS/<study>/runs/<run>) and multi-seed run (RUNS/<group>/seed-N) under the runs dir,
    one group after another (the newest first), each group's runs by name."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    own, studies = [], {}
    for p in runs_dir.iterdir():
        if not valid_name(p.name):
            continue
        if _is_run(p):
            own.append(info(p))
        elif p.is_dir():
            found = [info(q, name=f"{p.name}/{STUDY_RUNS}/{q.name}") for q in (p / STUDY_RUNS).iterdir()
                     if valid_name(q.name) and _is_run(q)] if (p / STUDY_RUNS).is_dir() else []
            found += [info(q, name=f"{p.name}/{q.name}") for q in p.iterdir() if _SEED_RE.match(q.name) and _is_run(q)]
            if found:
                studies[p.name] = sorted(found, key=lambda r: r.name)
    order = sorted(studies, key=lambda s: (-max(r.created for r in studies[s]), s))
    return sorted(own, key=lambda r: (-r.created, r.name)) + [r for s in order for r in studies[s]]


def new_run_dir(runs_dir: Path, method: str, rank: int, stamp: str | None = None) -> Path:
    """RUNS/<YYYYmmdd-HHMMSS>-<method>-r<rank>[-k], created empty (never reuses a folder)."""
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
    base = f"{stamp}-{re.sub(r'[^a-z0-9]', '', method.lower())}-r{int(rank)}"
    for k in range(1000):
        path = runs_dir / (base if k == 0 else f"{base}-{k}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a run folder for {base} in {runs_dir}")
