"""Process-level behaviour of a training run: deterministic mode, SIGTERM as a stop request, the exit
status file the trainer leaves for whoever started it, `run_trainer` (every trainer's main()), and a run's
process set-up: threads, the accelerator, the refusal of sharded training.

Reproducibility. On one machine, with the same flags, seed and thread count, two CPU runs are bit-identical
(float32 matmuls and convolutions are deterministic for a fixed number of threads). What changes results
without --deterministic: the number of intra-op threads (torch splits GEMM/convolution reductions by
thread, so 1, 2 or 16 threads sum in different orders: differences of ~1e-7 relative per op, which grow
through a deep UNet to ~1e-5 in the adapter after one step), a different CPU/ISA (AVX2 vs AVX-512 kernels),
and on GPU cuDNN's autotuned algorithm choice, atomics in some backward kernels and cuBLAS's split-K
workspaces. --deterministic fixes the thread count (--num_threads, default the number of cores this process
may use, read once at start), turns on torch.use_deterministic_algorithms (a non-deterministic kernel is
an error, not a silent difference), cuDNN's deterministic mode without benchmark autotuning, and
CUBLAS_WORKSPACE_CONFIG=:4096:8. Not guaranteed even then: identical results across machines, CPU
instruction sets, GPU models, library versions, or between CPU and GPU.

SIGTERM (what schedulers and the app's Cancel send): the loop finishes the step it is in, saves a
checkpoint at that step and exits with StoppedError (code 143 = 128 + SIGTERM). With several processes
the request is agreed on through one all-reduce per step, so every process stops after the same step.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import lowrank
from ground import runfolder

from . import StoppedError, TrainingError

CUBLAS_WORKSPACE = ":4096:8"


def default_num_threads() -> int:
    """The cores this process may run on (the affinity mask: what a scheduler or taskset granted)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not on Linux
        return os.cpu_count() or 1


def make_deterministic(num_threads: int | None = None) -> int:
    """Deterministic kernels and a fixed intra-op thread count; returns the thread count used."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    threads = num_threads or default_num_threads()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    return threads


class StopRequest:
    """Turns SIGTERM (and SIGUSR1, which some schedulers send ahead of the end of a job) into a flag the
    loop checks after each step. Only the main thread can install handlers; elsewhere it is a no-op."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, accelerator=None):
        self.accelerator, self.signum, self._old = accelerator, None, {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
            _installed.append(self)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "stop"

    def requested(self) -> bool:
        local = self.signum is not None
        acc = self.accelerator
        if acc is None or acc.num_processes == 1:
            return local
        flag = torch.tensor([float(local)], device=acc.device)
        agreed = bool(acc.reduce(flag, reduction="sum").item() > 0)   # every process stops after the same step
        if agreed and self.signum is None:
            self.signum = signal.SIGTERM
        return agreed

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
        if self in _installed:
            _installed.remove(self)


_installed: list[StopRequest] = []


def restore_signals() -> None:
    """Put back the handlers of every StopRequest still installed (a run that ended by an exception)."""
    for request in reversed(list(_installed)):
        request.restore()


def write_exit_status(output_dir, code: int, message: str) -> None:
    """RUN/exit_status.json {"code", "message"} from the main process, if the run folder exists."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    try:
        out = os.path.expanduser(str(output_dir))
        if os.path.isdir(out):
            runfolder.write_json(os.path.join(out, runfolder.EXIT_STATUS), {"code": code, "message": message})
    except OSError:   # a full disk: the exit code and the printed line still say it
        pass


def is_peer_failure(e: RuntimeError) -> bool:
    """A collective (all-reduce, barrier) that failed because another process is gone: gloo's and NCCL's
    connection errors, a collective timeout. Only in a multi-process run."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    text = str(e)
    return isinstance(e, getattr(dist, "DistBackendError", ())) or any(
        s in text for s in ("Connection reset by peer", "Connection closed by peer", "Timed out", "timed out",
                            "NCCL", "gloo"))


def peer_error_text(e: RuntimeError) -> str:
    """The backend's first sentence without its source location ('[.../pair.cc:561] Connection closed ...')."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0][:160]


def close_progress_bars() -> None:
    """End any open progress bar's line, so that the `error:` line after it is a line of its own."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


# a write that fails for lack of space or a broken disk: not a bug, one `error:` line and exit 1
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG}


# ----- the entry point -----------------------------------------------------------------------------------------
def run_trainer(parse_args: Callable, train: Callable, argv=None) -> int:
    """main() of every trainer: parse, train, and map failures to exit codes (0 done, 1 diverged or a
    failed write, 2 bad input, 143 stopped by SIGTERM). An output folder this run created is removed again
    if bad input stops it before any file. The code and its line go to RUN/exit_status.json, except bad input
    in a folder that existed before this command: that folder's record belongs to the run that made it."""
    created, out = None, None
    try:
        spec = parse_args(argv)   # the run, resolved once (training.common.spec.RunSpec)
        out = spec.output_dir
        created = None if out.exists() else out
        train(spec)
        write_exit_status(out, 0, "done")
        return 0
    except StoppedError as e:
        close_progress_bars()
        print(f"stopped: {e}", file=sys.stderr)
        write_exit_status(out, e.exit_code, f"stopped: {e}")
        return e.exit_code
    except (TrainingError, lowrank.AdapterError) as e:
        code = getattr(e, "exit_code", 2) if isinstance(e, TrainingError) else 2
        close_progress_bars()
        print(f"error: {e}", file=sys.stderr)
        if code == 2 and created is not None and created.is_dir() and \
                not any(p.is_file() for p in created.rglob("*")):
            shutil.rmtree(created, ignore_errors=True)
        elif out is not None and not (code == 2 and created is None):
            # bad input stops a run before it trains: in a folder that was already there (a finished or
            # stopped run, a mistyped rerun into it) the record of the run that made it stays as it was
            write_exit_status(out, code, f"error: {e}")
        return code
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        last = runfolder.list_checkpoints(out) if out is not None else []
        where = (f"the last complete checkpoint is {last[-1][1]}; free space, then continue with "
                 f"--resume_from_checkpoint latest") if last else "no complete checkpoint was written"
        message = f"cannot write {e.filename or out}: {e.strerror or e}; {where}"
        close_progress_bars()
        print(f"error: {message}", file=sys.stderr)
        write_exit_status(out, 1, f"error: {message}")
        return 1
    except RuntimeError as e:
        if not is_peer_failure(e):
            raise
        last = runfolder.list_checkpoints(out) if out is not None else []
        message = (f"another training process stopped (died, was killed or timed out after --ddp_timeout): "
                   f"{peer_error_text(e)}; " + (f"the last complete checkpoint is {last[-1][1]}; "
                   f"continue with --resume_from_checkpoint latest" if last else "no checkpoint was written yet"))
        close_progress_bars()
        print(f"error: {message}", file=sys.stderr)
        write_exit_status(out, 1, f"error: {message}")
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; continue with --resume_from_checkpoint latest", file=sys.stderr)
        write_exit_status(out, 130, "error: interrupted")
        return 130
    finally:
        restore_signals()


# ----- a run's process set-up (TrainingRun.__init__) -----------------------------------------------------------------
def set_threads(args) -> None:
    """--deterministic (deterministic kernels, a fixed thread count) or just --num_threads."""
    if getattr(args, "deterministic", False):
        make_deterministic(args.num_threads)
    elif getattr(args, "num_threads", None):
        torch.set_num_threads(args.num_threads)


def start_accelerator(args, folder: Path, report_to):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration

    # a bounded wait for the other processes: a dead worker ends the others' collectives with an error
    # after --ddp_timeout seconds instead of torch's default half hour
    timeout = getattr(args, "ddp_timeout", None)
    handlers = [InitProcessGroupKwargs(timeout=timedelta(seconds=timeout))] if timeout else []
    if getattr(args, "train_text_encoder", False):   # SDXL conditions on the penultimate hidden states: the first
        # text encoder's last layer gets no gradient, which DDP must be told of (as diffusers' SDXL script does)
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    return Accelerator(mixed_precision=args.mixed_precision, log_with=report_to, kwargs_handlers=handlers,
                       project_config=ProjectConfiguration(project_dir=str(folder),
                                                           logging_dir=str(folder / "logs")))


def refuse_sharding(acc) -> None:
    if acc.distributed_type.name in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        # adapters are a few MB and the models fit one GPU: sharding buys nothing, and saving and
        # resuming need whole (unsharded) adapter tensors on every process
        raise TrainingError(f"{acc.distributed_type.name} is not supported by this script; "
                            f"use data parallel: accelerate launch --multi_gpu --num_processes N")


def quiet_libraries() -> None:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
