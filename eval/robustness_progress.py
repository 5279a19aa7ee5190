"""A study's progress, on the terminal and on disk: the bar (runs ended of all, done / running / failed) and
OUTPUT_DIR/progress.json, rewritten (atomically) whenever a run starts or ends, so the app's Robustness tab and
anyone with a shell can follow a study that is still running, on this machine or on a Ray cluster.

    progress.json  {"total": 8, "counts": {"queued": 3, "running": 2, "trained": 2, "reused": 0, "failed": 1},
                    "runs": {"<run name>": {"state": "running", "length": "50 steps"}, ...},
                    "launcher": "ray", "host": ..., "pid": ..., "started": t, "updated": t, "finished": false}

A run's state is queued, running, then trained, reused (finished by an earlier command) or failed. `finished`
turns true when the launcher has every run's end (the report is written next); a study whose command was killed
keeps `finished: false` with an `updated` time that no longer moves.
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path

from tqdm.auto import tqdm

from ground.runfolder import read_json, write_json

PROGRESS = "progress.json"
STATES = ("queued", "running", "trained", "reused", "failed")
ENDED = ("trained", "reused", "failed")


class Progress:
    """The study's bar and progress.json: `runs` is {run name: its length, e.g. '50 steps'}, in launch order."""

    def __init__(self, runs: dict[str, str], folder: Path, launcher: str):
        self.runs = {name: {"state": "queued", "length": length} for name, length in runs.items()}
        self.path, self.launcher, self.started = Path(folder) / PROGRESS, launcher, time.time()
        self.bar = tqdm(total=len(runs), desc="robustness runs", unit="run")
        self.lock = threading.Lock()
        self.write(finished=False)

    def counts(self) -> dict[str, int]:
        return {s: sum(r["state"] == s for r in self.runs.values()) for s in STATES}

    def write(self, finished: bool) -> None:
        """The bar's counts, and progress.json with every run's state (called under the lock, or alone)."""
        c = self.counts()
        self.bar.set_postfix_str(f"done {c['trained'] + c['reused']}, running {c['running']}, failed {c['failed']}")
        write_json(self.path, {"total": len(self.runs), "counts": c, "runs": self.runs, "launcher": self.launcher,
                               "host": socket.gethostname(), "pid": os.getpid(), "started": self.started,
                               "updated": time.time(), "finished": finished})

    def set_running(self, names) -> None:
        """These runs are training now; a run not ended and not among them waits (Ray: no worker has it yet)."""
        names = set(names)
        with self.lock:
            before = {n: r["state"] for n, r in self.runs.items()}
            for name, run in self.runs.items():
                if run["state"] not in ENDED:
                    run["state"] = "running" if name in names else "queued"
            if before != {n: r["state"] for n, r in self.runs.items()}:
                self.write(finished=False)

    def start(self, name: str) -> None:
        with self.lock:
            self.runs[name]["state"] = "running"
            self.write(finished=False)

    def ended(self, r) -> None:
        """A run's RunResult: its state, and a line on the terminal."""
        with self.lock:
            self.runs[r.spec.name].update(state=r.status, **({"error": r.error} if r.error else {}))
            self.bar.update(1)
            self.write(finished=False)
        print(f"{r.status}: {r.spec.name}" + (f"  {r.error}" if r.error else ""), file=sys.stderr)

    def close(self) -> None:
        with self.lock:
            self.write(finished=True)
        self.bar.close()


def read_progress(folder: Path) -> dict | None:
    """FOLDER/progress.json, or None when the folder has none (a study written before it existed) or it is not
    a progress file."""
    data = read_json(Path(folder) / PROGRESS, default=None)
    return data if isinstance(data, dict) and isinstance(data.get("runs"), dict) else None
