"""Pieces every trainer shares (DreamBooth now; semantic-map and language trainers next).

    args.py        diffusers-named flags + one flag per AdapterConfig field
    models.py      load_pipeline(name_or_path) and the offline tiny SD preset (TINY)
    data.py        image loading/validation, the embedded example subject, deterministic batches
    checkpoint.py  atomic checkpoint-N/ directories, resume, rotation
    logging.py     metrics.jsonl + trackers, per-step weight distances
    samples.py     fixed-seed validation images, prompts.jsonl, sample grids

Imports point one way: training -> lowrank (never app or eval).
"""


class TrainingError(Exception):
    """Bad input or an unrecoverable training state. Trainers print it as one `error:` line, exit 2."""


class DivergedError(TrainingError):
    """The loss became NaN/inf. Trainers print it as one `error:` line and exit 1."""
