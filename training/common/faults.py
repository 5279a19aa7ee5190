"""Deterministic fault injection, so tests can kill a trainer or fill its disk at an exact moment of a
write instead of by chance timing. Not a flag (it never shows in --help): an environment variable

    LOWRANK_FAULT=<point>:<action>        e.g. LOWRANK_FAULT=checkpoint-between:kill
    LOWRANK_FAULT_STEP=N                  only at global step N (default: the first time the point is reached)
    LOWRANK_FAULT_PROCESS=P               only in process P of a DDP run (default: every process)

Points (where the trainer calls `fault_point`):
    checkpoint-before    checkpoint-N.tmp exists and is empty
    checkpoint-between   the adapter and the accelerator state are written, trainer_state.json is not
    checkpoint-after     every file is written in checkpoint-N.tmp, not yet renamed to checkpoint-N
    checkpoint-renamed   checkpoint-N is in place; older checkpoints not yet rotated, training not resumed
    final                the last step is done, the final adapter not yet written
    step                 after optimizer step N (with its metrics row and checkpoint, if any)
Actions:
    kill     SIGKILL this process (no handler, no cleanup: what an OOM killer or a power cut does)
    term     SIGTERM this process (what a scheduler or the app's Cancel sends)
    enospc   raise OSError(ENOSPC) as a full disk would, from inside the write
    exit     os._exit(3) (a worker that dies without a traceback, e.g. in a DDP test)
    abort    raise Abort, a BaseException nothing in the trainer catches: an in-process test stops the run at
             the exact point with the files as a SIGKILL leaves them (no cleanup runs; cheaper than a process)
    hang     block forever (a stuck process): a test kills whatever it likes at that exact moment, e.g. the
             worker process of a study launcher that started this trainer

Unset, a call costs one dictionary lookup.
"""
from __future__ import annotations

import errno
import os
import signal
import time

ENV, ENV_STEP, ENV_PROCESS = "LOWRANK_FAULT", "LOWRANK_FAULT_STEP", "LOWRANK_FAULT_PROCESS"
POINTS = ("checkpoint-before", "checkpoint-between", "checkpoint-after", "checkpoint-renamed", "final", "step")
ACTIONS = ("kill", "term", "enospc", "exit", "abort", "hang")
_fired = False


class Abort(BaseException):
    """The `abort` action: a simulated death, caught only by the test that asked for it."""


def parse(value: str) -> tuple[str, str]:
    point, _, action = value.strip().rpartition(":")
    if point not in POINTS or action not in ACTIONS:
        raise ValueError(f"{ENV}={value!r}: expected <point>:<action> with point in {', '.join(POINTS)} and "
                         f"action in {', '.join(ACTIONS)}")
    return point, action


def fault_point(point: str, step: int | None = None, process_index: int = 0, path: str = "") -> None:
    """Trigger the configured fault if this is its point (and step, and process). Fires once per process."""
    global _fired
    value = os.environ.get(ENV)
    if not value or _fired:
        return
    where, action = parse(value)
    if where != point:
        return
    if os.environ.get(ENV_STEP) and (step is None or int(os.environ[ENV_STEP]) != step):
        return
    if os.environ.get(ENV_PROCESS) and int(os.environ[ENV_PROCESS]) != process_index:
        return
    _fired = True
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "term":
        os.kill(os.getpid(), signal.SIGTERM)   # the handler runs at the next bytecode in the main thread
    elif action == "exit":
        os._exit(3)
    elif action == "abort":
        raise Abort(f"{point} at step {step}")
    elif action == "hang":
        while True:
            time.sleep(3600)
    else:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path or None)


def reset() -> None:
    """Arm the fault again (in-process tests run several trainers in one process)."""
    global _fired
    _fired = False
