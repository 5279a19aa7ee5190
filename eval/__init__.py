"""eval: score fine-tuned Stable Diffusion runs the way the DeLoRA/ETHER papers do.

    python -m eval.subject --real_dir DIR --generated_dir DIR      DINO, CLIP-I, CLIP-T of a folder
    python -m eval.subject --run_dir RUN [--checkpoints all]       generate + score every checkpoint -> RUN/eval.jsonl
    python -m eval.segmentation --generated_dir DIR --label_dir DIR   mIoU + pixel accuracy (ADE20K)
    python -m eval.segmentation --run_dir RUN --checkpoints all    a semantic-map run, checkpoint by checkpoint
    python -m eval.report RUN [RUN ...] --out DIR                  Markdown/CSV table, plots, sample grid
    python -m eval.robustness --ablation                           the DeLoRA robustness study and its report
    python -m eval.robustness_tables OUTPUT_DIR                    a finished study's tables, from its CSV files

Modules, by what they are:
  metrics   embed.py (DINO/CLIP embedders with a per-model cache), miou.py (confusion matrix, mIoU),
            fid.py (FID), upernet101.py (the papers' segmenter), prompts.py (DreamBooth's prompt lists),
            drift.py (peft's drift: the base model's and a checkpoint's images of unrelated prompts)
  runners   subject.py (DINO/CLIP of a folder or a run), segmentation.py (mIoU of a folder or, through
            semantic_run.py, a semantic-map run), generate.py (a run's pipeline + a checkpoint's adapter)
  reports   report.py + plots.py (runs compared), robustness.py (the study: plan and runs) with
            robustness_tasks.py, robustness_report.py, robustness_figures.py, robustness_tables.py (the report's
            tables; rewrites them from a study's CSV files) and robustness_summary.py (worst / area / window of
            a learning-rate sweep); tables.py (numbers in the Markdown tables)
  shared    common.py (errors, atomic files, run folders, RUN/eval.jsonl), images.py (image folders,
            prompts.jsonl)
Imports point one way: eval -> training's shared and task modules (training/common/, training/<task>/; never a
trainer script) -> lowrank.

Imported inside functions, and only there, because they are heavy and only some commands need them:
diffusers, transformers, torchvision, huggingface_hub. No project module is imported inside a function
(tests/test_house.py reads this paragraph and holds the code to it).

Every CLI prints bad input as one `error: <message>` line on stderr and exits 2; outputs are written
under a temporary name and renamed, so a failed run never leaves half a file.
"""

from ground.cli import CommandError


class EvalError(CommandError):
    """Bad input (missing folders, unreadable models, malformed files): one line that says what to do."""
