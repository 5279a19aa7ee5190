"""The runs of a robustness study and the local launcher. What one run is (RunSpec: its folder and trainer
command), when it is done, how it starts (fresh, or resumed from its latest checkpoint), how its end reads
(RunResult) are shared by both launchers: `--launcher local` trains --jobs subprocesses on
this machine (here), `--launcher ray` one Ray task per run (eval/robustness_ray.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ground.cli import error_line
from ground.runfolder import EXIT_STATUS, is_adapter_dir, list_checkpoints, read_json

from .robustness_progress import Progress
from .robustness_tasks import ROOT

RESUME = ["--resume_from_checkpoint", "latest"]


@dataclass
class RunSpec:
    """One training run of the study: what to train and where it lands."""
    study: str
    label: str                     # legend / table label
    method: str
    factor: float
    lr: float
    steps: int                     # with `epochs` set, the run is sized in epochs and this is unused
    lambda_lr: float | None = None
    extra: list[str] = field(default_factory=list)
    seed: int = 0
    epochs: int | None = None

    @property
    def name(self) -> str:   # the folder: equal settings share one run (factor 1 of the sweep = App. D's)
        opts = "".join(f"-{a.lstrip('-')}" for a in self.extra).replace("_", "")
        # a λ rate equal to the adapter rate is the trainer's default: the same run as without the flag
        lam = f"-lamlr{self.lambda_lr:g}" if self.lambda_lr not in (None, self.lr) else ""
        length = f"e{self.epochs}" if self.epochs else f"n{self.steps}"
        return f"{self.method}{opts}-lr{self.lr:g}{lam}-{length}-s{self.seed}"

    @property
    def length(self) -> str:
        return f"{self.epochs} epochs" if self.epochs else f"{self.steps} steps"

    @property
    def group(self) -> tuple:
        """The settings without the seed: runs that differ only in their seed are averaged together."""
        return (self.study, self.label, self.method, self.factor, self.lr, self.lambda_lr, tuple(self.extra),
                self.steps, self.epochs)


@dataclass
class RunResult:
    spec: RunSpec
    folder: Path
    status: str                    # reused | trained | failed
    error: str = ""
    command: list[str] = field(default_factory=list)


@dataclass
class Launch:
    """A run to train: its folder, trainer command (resuming when it has checkpoints) and log file."""
    spec: RunSpec
    folder: Path
    command: list[str]
    log: Path


def finished(folder: Path) -> bool:
    """The final adapter is there and the trainer did not record a failure after writing it."""
    status = read_json(folder / EXIT_STATUS, default={}) or {}
    return is_adapter_dir(folder) and status.get("code", 0) == 0


def trainer_command(spec: RunSpec, folder: Path, script: Path, args, passthrough: list[str]) -> list[str]:
    length = ["--num_train_epochs", str(spec.epochs)] if spec.epochs else ["--max_train_steps", str(spec.steps)]
    every = args.checkpointing_steps if spec.epochs else min(args.checkpointing_steps, spec.steps)
    cmd = [sys.executable, str(script), "--output_dir", str(folder), "--method", spec.method,
           "--learning_rate", f"{spec.lr:g}", *length, "--checkpointing_steps", str(every), "--seed", str(spec.seed)]
    if args.threads_per_run and not args.threads_given:
        cmd += ["--num_threads", str(args.threads_per_run)]
    if spec.lambda_lr not in (None, spec.lr):
        cmd += ["--lambda_learning_rate", f"{spec.lambda_lr:g}"]
    return cmd + spec.extra + passthrough


def launch(spec: RunSpec, args, task, passthrough: list[str]) -> Launch | RunResult:
    """The run's Launch, or its RunResult 'reused' when it is already finished (never trained twice)."""
    folder = args.output_dir / "runs" / spec.name
    cmd = trainer_command(spec, folder, task.script, args, passthrough)
    if finished(folder):
        return RunResult(spec, folder, "reused", command=cmd)
    if list_checkpoints(folder):   # interrupted earlier: go on from where it stopped
        cmd = cmd + RESUME
    folder.parent.mkdir(parents=True, exist_ok=True)
    return Launch(spec, folder, cmd, folder.parent / f"{spec.name}.log")


def outcome(run: Launch, returncode: int) -> RunResult:
    """How the trainer's end reads: trained, or failed with the error line of its log."""
    if returncode != 0 or not finished(run.folder):
        text = run.log.read_text(errors="replace") if run.log.is_file() else ""
        error = error_line(text.splitlines()) or "no output"
        return RunResult(run.spec, run.folder, "failed", f"exit {returncode}: {error} (log: {run.log})", run.command)
    return RunResult(run.spec, run.folder, "trained", command=run.command)


def distinct(specs: list[RunSpec]) -> list[RunSpec]:
    """Each run once (the same settings in two studies: one run), the longest first so the last lane does not
    wait on one long run."""
    unique = list({s.name: s for s in specs}.values())
    unique.sort(key=lambda s: (s.epochs or 0, s.steps), reverse=True)
    return unique


def per_spec(specs: list[RunSpec], done: dict[str, RunResult]) -> list[RunResult]:
    """One result per spec of the plan (a run shared by two studies is a row of each)."""
    return [RunResult(s, done[s.name].folder, done[s.name].status, done[s.name].error, done[s.name].command)
            for s in specs]


def run_local(specs: list[RunSpec], args, task, passthrough: list[str]) -> list[RunResult]:
    """Train every distinct run here, --jobs at a time (threads only wait on the trainer subprocesses)."""
    unique = distinct(specs)
    progress, done = Progress({s.name: s.length for s in unique}, args.output_dir, "local"), {}

    def one(spec: RunSpec) -> RunResult:
        run = launch(spec, args, task, passthrough)
        if isinstance(run, Launch):
            progress.start(spec.name)
            with open(run.log, "w") as out:
                proc = subprocess.run(run.command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                      env=os.environ.copy())
            run = outcome(run, proc.returncode)
        progress.ended(run)
        return run
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for spec, r in zip(unique, pool.map(one, unique)):
            done[spec.name] = r
    progress.close()
    return per_spec(specs, done)
