"""The one-at-a-time job queue: each job is a subprocess (the trainer, or eval/ scoring), run in its
own process group with stdout+stderr appended to RUN/<log>, one after another in submission order.

    q = JobQueue(grace_s=10)
    job = q.submit(Job(id=run_name, run_dir=run_dir, cmd=[...]))
    q.position(job.id)     # 0 running, 1.. waiting (1 = next), None once done
    q.cancel(job.id)       # queued: dropped; running: SIGTERM to the group, SIGKILL after grace_s
    q.shutdown()           # cancels everything (used when the app stops, and by tests)

Train jobs (track=True) record RUN/pid when they start and RUN/exit_code when they end (see runs.py),
so a restarted app can tell finished, failed and dead runs apart.
"""
from __future__ import annotations

import collections
import os
import shlex
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import runs

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Job:
    id: str
    run_dir: Path
    cmd: list[str]
    kind: str = "train"                  # "train" or "eval"
    log_name: str = runs.LOG_FILE
    track: bool = True                   # write RUN/pid and RUN/exit_code
    env: dict[str, str] = field(default_factory=dict)
    state: str = "queued"                # queued, running, finished, failed, cancelled
    returncode: int | None = None
    note: str = ""
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    cancel_requested: bool = False
    cancel_time: float | None = None      # time.monotonic() of the SIGTERM
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        return self.state in ("finished", "failed", "cancelled")


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    path = env.get("PYTHONPATH", "")
    if str(PROJECT_ROOT) not in path.split(os.pathsep):   # works from a checkout that is not installed
        env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT)] + ([path] if path else []))
    env.update(extra or {})
    return env


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class JobQueue:
    def __init__(self, grace_s: float = 10.0, cwd: Path | None = None):
        self.grace_s = grace_s
        self.cwd = Path(cwd or PROJECT_ROOT)
        self._cond = threading.Condition()
        self._pending: collections.deque[Job] = collections.deque()
        self._current: Job | None = None
        self._jobs: dict[str, Job] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="lowrank-jobs", daemon=True)
        self._thread.start()

    # ----- queries --------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    def position(self, job_id: str) -> int | None:
        with self._cond:
            if self._current is not None and self._current.id == job_id:
                return 0
            for i, job in enumerate(self._pending, start=1):
                if job.id == job_id:
                    return i
            return None

    def active(self) -> list[Job]:
        """The running job (if any) then the waiting ones, in order."""
        with self._cond:
            return ([self._current] if self._current else []) + list(self._pending)

    @property
    def current(self) -> Job | None:
        with self._cond:
            return self._current

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._current is not None or bool(self._pending)

    # ----- changes --------------------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        with self._cond:
            if self._closed:
                raise RuntimeError("the job queue is shut down")
            if job.id in self._jobs and not self._jobs[job.id].done:
                raise ValueError(f"job {job.id!r} is already queued or running")
            job.state = "queued"
            self._jobs[job.id] = job
            self._pending.append(job)
            self._cond.notify_all()
        return job

    def cancel(self, job_id: str) -> bool:
        """True if the job was queued or running. Never blocks: a running job's process group gets
        SIGTERM now and SIGKILL grace_s later if it is still there."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or job.done:
                return False
            job.cancel_requested = True
            job.cancel_time = job.cancel_time or time.monotonic()
            if job in self._pending:
                self._pending.remove(job)
                self._finish(job, None, "cancelled before it started")
                self._cond.notify_all()
                return True
            proc = job.proc
        if proc is not None:
            _signal_group(proc.pid, signal.SIGTERM)
        return True

    def cancel_all(self) -> int:
        return sum(self.cancel(job.id) for job in reversed(self.active()))

    def wait(self, job_ids: list[str] | None = None, timeout: float | None = None) -> bool:
        """Block until the given jobs (default: all) are done; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                jobs = [self._jobs[i] for i in job_ids if i in self._jobs] if job_ids is not None \
                    else [self._current, *self._pending]
                if all(j is None or j.done for j in jobs):
                    return True
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(timeout=min(left, 0.5) if left is not None else 0.5)

    def shutdown(self, timeout: float | None = None) -> None:
        """Cancel every job and stop the worker (the app's exit path: no orphan trainers)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self.cancel_all()
        self._thread.join(timeout=timeout if timeout is not None else self.grace_s + 5)

    # ----- the worker -----------------------------------------------------------------------------
    def _finish(self, job: Job, returncode: int | None, note: str = "") -> None:
        if job.track:   # the exit file first: once the job reads as done, its files say how it ended
            try:
                runs.write_exit(job.run_dir, returncode, cancelled=job.cancel_requested, note=note)
            except OSError:
                pass
        job.returncode, job.ended = returncode, time.time()
        job.note = note or ("" if returncode == 0 else f"exited with code {returncode}")
        job.state = "cancelled" if job.cancel_requested else ("finished" if returncode == 0 else "failed")

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                job = self._current = self._pending.popleft()
                job.state, job.started = "running", time.time()
            try:
                self._run(job)
            except Exception as e:   # never let one bad job kill the worker
                if not job.done:
                    self._finish(job, None, f"could not run the job: {type(e).__name__}: {e}")
            finally:
                with self._cond:
                    self._current = None
                    self._cond.notify_all()

    def _run(self, job: Job) -> None:
        job.run_dir.mkdir(parents=True, exist_ok=True)
        with open(job.run_dir / job.log_name, "ab", buffering=0) as log:
            log.write(f"$ {shlex.join(job.cmd)}\n".encode())
            try:
                proc = subprocess.Popen(job.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        cwd=self.cwd, env=child_env(job.env), start_new_session=True)
            except OSError as e:
                log.write(f"error: could not start {job.cmd[0]}: {e}\n".encode())
                self._finish(job, None, f"could not start the process: {e}")
                return
            with self._cond:
                job.proc = proc
                cancelled_meanwhile = job.cancel_requested
            if job.track:
                runs.write_pid(job.run_dir, proc.pid)
            if cancelled_meanwhile:
                _signal_group(proc.pid, signal.SIGTERM)
            while True:
                try:
                    rc = proc.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    if job.cancel_time is not None and time.monotonic() - job.cancel_time > self.grace_s:
                        _signal_group(proc.pid, signal.SIGKILL)
            # the leader is gone; children of a cancelled (or crashed) run get the same grace, then SIGKILL
            if _group_alive(proc.pid):
                if not job.cancel_requested:
                    _signal_group(proc.pid, signal.SIGTERM)
                end = time.monotonic() + self.grace_s
                while _group_alive(proc.pid) and time.monotonic() < end:
                    time.sleep(0.1)
                _signal_group(proc.pid, signal.SIGKILL)
                # SIGKILL is asynchronous: the run is over only once the kernel has removed the processes
                # (a busy machine takes a moment), so nothing of it still writes when the job reports done
                end = time.monotonic() + 10
                while _group_alive(proc.pid) and time.monotonic() < end:
                    time.sleep(0.05)
            if job.cancel_requested:
                log.write(b"\n[lowrank-app] cancelled by the user\n")
            self._finish(job, rc)
