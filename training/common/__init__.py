"""What every trainer uses unchanged: a trainer (dreambooth.py, ...) is its task's data, loss and sampling on these.

    tasks.py       the task registry: every task declared once (TaskInfo), read by exports, cards, eval, the app
    spec.py        RunSpec: a run resolved once from a trainer's flags (resolve_run), taken as given downstream
    loop.py        TrainingRun: seed, resume, adapter, the phases of `fit` (prepare, optimizer step, metrics
                   row, checkpoint/validation/stop, finish)
    task.py        Task: what a trainer plugs into the loop (its loss, and hooks with defaults)
    batches.py     deterministic batches (mix_seed, epoch_batches) and the run length (total_steps)
    args.py        diffusers-named flags + one flag per AdapterConfig field, the run length's defaults
    checkpoint.py  atomic checkpoint-N/ directories, resume, rotation
    ema.py         --ema_decay: the adapter's moving average, saved beside checkpoints and the final adapter
    runtime.py     --deterministic, SIGTERM as a stop request, exit_status.json, run_trainer (every main()),
                   the accelerator set-up and the refusal of FSDP/DeepSpeed
    errors.py      TrainingError, DivergedError, StoppedError and the exit codes
    faults.py      fault injection at exact points of the loop and of a checkpoint write (the tests' kills)
    tracking.py    console logging, metrics.jsonl + trackers, per-step weight distances, live-rank heat map
    results.py     results.json in peft's method-comparison shape, mean ± std over seeds
    models.py      load_pipeline(name_or_path) and the offline tiny SD preset (TINY)
    hfdata.py      --dataset_name through `datasets`: save_to_disk folders, parquet/JSON/CSV, imagefolders, hub
    export.py      exact diffusers/kohya/peft/diff files and merged pipelines from a diffusion run
    model_card.py  the README.md model card of every finished run and export

Each task's own data, model set-up and loss live in its package: training.images (image files and samples,
shared by the two image tasks), training.subject (DreamBooth), training.segmap (map-to-image),
training.text (language models and tasks). The run folder's layout and readers are ground.runfolder's.
Imports point one way: training -> lowrank (never app or eval).
"""
from .errors import DivergedError, StoppedError, TrainingError

__all__ = ["DivergedError", "StoppedError", "TrainingError"]
