"""Deterministic batches and the run length, shared by the loop and the tasks' datasets.

The batch order of an epoch is a function of (seed, epoch) and a dataset's augmentation a function of
(seed, run position), so a resumed run sees exactly the batches the uninterrupted run saw, with no RNG
state to carry over.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence: well mixed, same on every platform)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int, process_index: int = 0,
                  num_processes: int = 1) -> list[list[int]]:
    """This process's batches of epoch `epoch`, as lists of run positions (epoch * n + i).

    The permutation depends on (seed, epoch) only, so every process agrees; it is padded by wrapping so
    all processes get the same number of batches (an uneven shard would deadlock DDP's all-reduce).
    Datasets take a run position k and use example k % n (seeding their augmentation from k)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, epoch))).tolist()
    per = math.ceil(n / num_processes)
    perm = (perm * num_processes)[: per * num_processes]
    mine = [epoch * n + i for i in perm[process_index::num_processes]]
    return [mine[j:j + batch_size] for j in range(0, len(mine), batch_size)]


def steps_per_epoch(n: int, batch_size: int, grad_accum: int, num_processes: int = 1) -> int:
    return math.ceil(math.ceil(math.ceil(n / num_processes) / batch_size) / grad_accum)


def total_steps(args, num_examples: int, num_processes: int = 1) -> int:
    """The run's number of optimizer steps: --max_train_steps, else --num_train_epochs epochs of
    `num_examples` examples (every trainer's run length, derived here only)."""
    return args.max_train_steps or args.num_train_epochs * steps_per_epoch(
        num_examples, args.train_batch_size, args.gradient_accumulation_steps, num_processes)
