"""Pieces every trainer shares: a trainer (dreambooth.py, ...) is its data, loss and sampling on these.

    loop.py        TrainingRun + Task: seed, resume, optimizer, the step, NaN checks, checkpoints, exit codes
    args.py        diffusers-named flags + one flag per AdapterConfig field
    models.py      load_pipeline(name_or_path) and the offline tiny SD preset (TINY)
    data.py        image loading/validation, --dataset_name images and captions, the embedded example subject
    hfdata.py      --dataset_name through `datasets`: save_to_disk folders, parquet/JSON/CSV, imagefolders, hub
    checkpoint.py  atomic checkpoint-N/ directories, resume, rotation
    logging.py     metrics.jsonl + trackers, per-step weight distances
    samples.py     fixed-seed validation images, prompts.jsonl, sample grids

The run folder's layout and readers are lowrank.runfolder's. Imports point one way: training -> lowrank
(never app or eval).
"""
from lowrank.cli import CommandError


class TrainingError(CommandError):
    """Bad input or an unrecoverable training state. Trainers print it as one `error:` line, exit 2."""


class DivergedError(TrainingError):
    """The loss became NaN/inf. Trainers print it as one `error:` line and exit 1."""

    exit_code = 1


class StoppedError(TrainingError):
    """SIGTERM during training: a checkpoint at the current step is saved. Printed as a `stopped:` line;
    exit 143 (128 + SIGTERM, what a process killed by it reports)."""

    exit_code = 143
