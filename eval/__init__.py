"""eval: score fine-tuned Stable Diffusion runs the way the DeLoRA/ETHER papers do.

    python -m eval.subject --real_dir DIR --generated_dir DIR      DINO, CLIP-I, CLIP-T of a folder
    python -m eval.subject --run_dir RUN [--checkpoints all]       generate + score every checkpoint -> RUN/eval.jsonl
    python -m eval.segmentation --generated_dir DIR --label_dir DIR   mIoU + pixel accuracy (ADE20K)
    python -m eval.report RUN [RUN ...] --out DIR                  Markdown/CSV table, plots, sample grid

Modules: common.py (errors, atomic files, run folders), images.py (image folders, prompts.jsonl),
embed.py (DINO/CLIP embedders with a per-model cache), prompts.py (DreamBooth's prompt lists),
generate.py (the only code that imports lowrank/training: pipelines and adapters), subject.py,
segmentation.py, report.py, plots.py.

Every CLI prints bad input as one `error: <message>` line on stderr and exits 2; outputs are written
under a temporary name and renamed, so a failed run never leaves half a file.
"""

from lowrank.cli import CommandError


class EvalError(CommandError):
    """Bad input (missing folders, unreadable models, malformed files): one line that says what to do."""
