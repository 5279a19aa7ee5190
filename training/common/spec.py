"""A run, resolved once: `resolve_run(args, TASK)` turns a trainer's parsed flags into the `RunSpec` that every
later step takes as given (TrainingRun, run_trainer, the loop). Nothing downstream re-derives the output
folder, the adapter config, the run length or the learning rate from the flags.

    spec = resolve_run(args, DREAMBOOTH, default_steps=(300, 3))    # end of a trainer's parse_args
    spec.output_dir, spec.adapter, spec.learning_rate, spec.max_train_steps, spec.checkpointing_steps
    spec.adapter_for(target_modules=[...], dyndora_total_steps=n)   # values known only later (the model's
                                                                    # layers, the data's length) fill the
                                                                    # fields the user left unset
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path

from lowrank import METHODS, AdapterConfig

from .args import check_folder_path, check_training_args, resolve_run_length
from .tasks import TaskInfo


@dataclass(frozen=True)
class RunSpec:
    """Everything a trainer's run is, from its flags: the task, the output folder, the adapter, the run length
    and the learning rates. `args` keeps every flag as given (run.json records them)."""

    task: TaskInfo
    args: argparse.Namespace
    output_dir: Path
    adapter: AdapterConfig                 # from the flags the user set (+ the task's static fills)
    adapter_given: frozenset[str]          # the AdapterConfig fields the user set
    learning_rate: float                   # --learning_rate, else the method's default
    lambda_learning_rate: float | None     # None: the adapter's rate
    max_train_steps: int | None            # None: --num_train_epochs epochs of the data (known at fit)
    num_train_epochs: int
    checkpointing_steps: int

    @property
    def method(self) -> str:
        return self.adapter.method

    def adapter_for(self, **fill: typing.Any) -> AdapterConfig:
        """The adapter with `fill` for the fields the user left unset (targets per model, dyndora_total_steps)."""
        unset = {k: v for k, v in fill.items() if k not in self.adapter_given}
        return dataclasses.replace(self.adapter, **unset) if unset else self.adapter

    def with_seed(self, seed: int, output_dir: Path) -> RunSpec:
        """One run of a multi-seed command (glue.py/instruct.py --seeds): its seed and its own folder."""
        args = copy.copy(self.args)   # a copy keeps what the parser knows of its flags (config.Flags)
        args.seed, args.seeds, args.output_dir = seed, None, str(output_dir)
        return dataclasses.replace(self, args=args, output_dir=output_dir)


def adapter_fields(args: argparse.Namespace) -> dict:
    """The AdapterConfig fields the user set on the command line (flags default to None)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(AdapterConfig)
            if getattr(args, f.name, None) is not None}


def resolve_run(args: argparse.Namespace, task: TaskInfo, default_steps: tuple[int, int] | None = None,
                **fill: typing.Any) -> RunSpec:
    """The run the flags describe, checked: the run length (see resolve_run_length; filled into `args` too,
    where run.json records it), the output folder (default: the task's), the adapter (`fill` gives defaults
    for fields the user left unset; lowrank.ConfigError on a bad value), the learning rate."""
    resolve_run_length(args, default_steps)
    check_training_args(args)
    given = adapter_fields(args)
    adapter = AdapterConfig(**{**{k: v for k, v in fill.items() if k not in given}, **given})
    if args.output_dir is None:
        args.output_dir = task.default_output(adapter.method, getattr(args, task.output_flag or "", None))
    output_dir = Path(args.output_dir).expanduser()
    check_folder_path(output_dir, "--output_dir")
    return RunSpec(task=task, args=args, output_dir=output_dir, adapter=adapter, adapter_given=frozenset(given),
                   learning_rate=args.learning_rate or METHODS[adapter.method].default_learning_rate,
                   lambda_learning_rate=args.lambda_learning_rate, max_train_steps=args.max_train_steps,
                   num_train_epochs=args.num_train_epochs, checkpointing_steps=args.checkpointing_steps)
