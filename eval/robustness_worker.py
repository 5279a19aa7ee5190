"""What a Ray worker runs for `eval.robustness --launcher ray`: the standard library only, since Ray sends these
functions by value (eval/robustness_ray.py), so a node needs Ray and the trainer's Python, not this module.

A run's task starts the same trainer command as the local launcher, as a child of the worker that dies with
it (PR_SET_PDEATHSIG: a worker killed by SIGKILL, the OOM killer or a lost node leaves no trainer behind
writing into the run folder while the retry trains there). Every attempt appends to RUN.attempts.jsonl
beside the run's log (worker and trainer process ids, node), which is how a retry knows it is one: it adds
`--resume_from_checkpoint latest` (a run with no checkpoint yet starts fresh) and appends to the log."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

RESUME_FLAG = "--resume_from_checkpoint"
# The trainer's launcher, run by the worker's Python: ask the kernel for SIGKILL when the worker dies, make
# sure the worker did not die before that, then become the trainer (exec keeps the request).
DIE_WITH_WORKER = """
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # 1: PR_SET_PDEATHSIG (Linux)
except (OSError, AttributeError):
    pass
if os.getppid() != int(sys.argv[1]):
    os._exit(70)
os.execv(sys.argv[2], sys.argv[2:])
"""


def record(attempts: Path, event: dict) -> None:
    with open(attempts, "a") as f:
        f.write(json.dumps(event) + "\n")


def started_attempts(attempts: Path) -> int:
    lines = attempts.read_text().splitlines() if attempts.is_file() else []
    return sum("worker_pid" in json.loads(line) for line in lines if line.strip())


def train_run(command: list[str], log: str, attempts: str, cwd: str, env: dict[str, str]) -> int:
    """One attempt at a run: the trainer's exit status (a failure of the run itself is a status, not an
    exception, so Ray retries only when the worker is lost)."""
    attempts_file = Path(attempts)
    attempt = started_attempts(attempts_file) + 1
    if attempt > 1 and RESUME_FLAG not in command:
        command = command + [RESUME_FLAG, "latest"]
    record(attempts_file, {"attempt": attempt, "worker_pid": os.getpid(), "node": socket.gethostname(),
                           "started": time.time()})
    with open(log, "a" if attempt > 1 else "w") as out:
        if attempt > 1:
            out.write(f"\n--- attempt {attempt}: the worker of the previous attempt was lost; resuming from the "
                      f"latest checkpoint\n")
            out.flush()
        proc = subprocess.Popen([sys.executable, "-c", DIE_WITH_WORKER, str(os.getpid()), *command], stdout=out,
                                stderr=subprocess.STDOUT, cwd=cwd, env={**os.environ, **env})
        record(attempts_file, {"attempt": attempt, "trainer_pid": proc.pid})
        return proc.wait()


def write_probe(folder: str, name: str, token: str) -> str:
    """Create the study folder if needed and write a probe file there: '' or what went wrong."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / name).write_text(token)
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"
    return ""


def remove_probe(folder: str, name: str) -> None:
    (Path(folder) / name).unlink(missing_ok=True)
