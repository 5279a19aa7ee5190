"""Deterministic batches and the run length, shared by the loop and the tasks' datasets.

The batch order of an epoch is a function of (seed, epoch) and a dataset's augmentation a function of
(seed, run position), so a resumed run sees exactly the batches the uninterrupted run saw, with no RNG
state to carry over.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence: well mixed, same on every platform)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int, process_index: int = 0,
                  num_processes: int = 1, groups: list | None = None) -> list[list[int]]:
    """This process's batches of epoch `epoch`, as lists of run positions (epoch * n + i).

    The permutation depends on (seed, epoch) only, so every process agrees; it is padded by wrapping so
    all processes get the same number of batches (an uneven shard would deadlock DDP's all-reduce).
    Datasets take a run position k and use example k % n (seeding their augmentation from k).
    With `groups` (a sortable group of each example: an aspect-ratio bucket), see `group_batches`."""
    if groups is not None:
        return group_batches(groups, batch_size, epoch, seed, process_index, num_processes)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, epoch))).tolist()
    mine = [epoch * n + i for i in deal(perm, process_index, num_processes)]
    return [mine[j:j + batch_size] for j in range(0, len(mine), batch_size)]


def deal(items: list, process_index: int, num_processes: int) -> list:
    """This process's share of `items`, every process's as long: padded by wrapping, then dealt round-robin."""
    per = math.ceil(len(items) / num_processes)
    return (items * num_processes)[: per * num_processes][process_index::num_processes]


def group_batches(groups: list, batch_size: int, epoch: int, seed: int, process_index: int = 0,
                  num_processes: int = 1) -> list[list[int]]:
    """Batches that never mix groups: the (seed, epoch) permutation of the examples, each group's examples in that
    order cut into batches (a group's last batch may be short), the batches in an order drawn from (seed, epoch, 1),
    dealt to the processes as `epoch_batches` deals examples (padded by wrapping)."""
    n = len(groups)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, epoch))).tolist()
    batches = []
    for group in sorted(set(groups)):
        members = [i for i in perm if groups[i] == group]
        batches += [members[j:j + batch_size] for j in range(0, len(members), batch_size)]
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(mix_seed(seed, epoch, 1))).tolist()
    return [[epoch * n + i for i in b] for b in deal([batches[o] for o in order], process_index, num_processes)]


def steps_per_epoch(n: int, batch_size: int, grad_accum: int, num_processes: int = 1,
                    groups: list | None = None) -> int:
    if groups is not None:   # every group's batches, then dealt to the processes
        batches = sum(math.ceil(groups.count(g) / batch_size) for g in set(groups))
        return math.ceil(math.ceil(batches / num_processes) / grad_accum)
    return math.ceil(math.ceil(math.ceil(n / num_processes) / batch_size) / grad_accum)


def total_steps(args, num_examples: int, num_processes: int = 1, groups: list | None = None) -> int:
    """The run's number of optimizer steps: --max_train_steps, else --num_train_epochs epochs of
    `num_examples` examples (every trainer's run length, derived here only)."""
    return args.max_train_steps or args.num_train_epochs * steps_per_epoch(
        num_examples, args.train_batch_size, args.gradient_accumulation_steps, num_processes, groups)


def epoch_loader(dataset, collate: Callable, args, epoch: int, step: int, per_epoch: int, seed: int,
                 process_index: int, num_processes: int):
    """The epoch's micro-batches left at `step` (a resumed run skips what it already did), and the optimizer
    steps they make: [(micro-batches in the step, whether it is the epoch's last)]."""
    accum = args.gradient_accumulation_steps
    batches = epoch_batches(len(dataset), args.train_batch_size, epoch, seed, process_index, num_processes,
                            getattr(dataset, "groups", None))
    remaining = batches[(step - epoch * per_epoch) * accum:]
    # A loader's iterator draws its base seed from the global RNG, which dropout uses too. A straight run
    # draws it at the epoch's start, before any checkpoint of the epoch saved the RNG state; a run resumed
    # mid-epoch must not draw it again after restoring that state, or its dropout masks would differ.
    own = torch.Generator().manual_seed(seed + epoch) if step > epoch * per_epoch else None
    loader = iter(torch.utils.data.DataLoader(dataset, batch_sampler=remaining, collate_fn=collate,
                                              num_workers=args.dataloader_num_workers, generator=own))
    # the epoch's last step may have fewer micro-batches
    groups = [(min(accum, len(remaining) - start), start + accum >= len(remaining))
              for start in range(0, len(remaining), accum)]
    return loader, groups
