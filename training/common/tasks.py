"""The task registry: every task the product trains, declared once. The trainers, the loop, exports, model
cards, eval (report, robustness study) and the app read a task from here and nowhere else.

    from training.common.tasks import DREAMBOOTH, TASKS, task_of
    DREAMBOOTH.name, DREAMBOOTH.script, DREAMBOOTH.default_output("delora")
    task_of(run_json)            # the TaskInfo a run folder was trained by (old spellings included), or None

Adding a task: its trainer script (training/<name>.py), its package (its data, model set-up and loss), and one
entry here. Nothing else lists tasks (training/README.md says what reads which field).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
OUTPUTS_DIR = "outputs"   # where a run goes when --output_dir is not given (the app lists this folder)

# a language task's transformers head -> (the model card's pipeline_tag, the Auto class that loads it)
HEADS = {"classification": ("text-classification", "AutoModelForSequenceClassification"),
         "causal": ("text-generation", "AutoModelForCausalLM")}


@dataclass(frozen=True)
class TaskInfo:
    """One task: what every reader of a run folder, and the app, needs to know about it."""

    name: str                 # run.json's "task", eval's and the app's --task, the trainer's file name
    kind: str                 # "image" (a diffusion pipeline) or "text" (a transformers model)
    summary: str              # one line for help texts and the app
    model_flag: str           # the trainer's base-model flag
    scorer: str | None        # the eval module that scores a run folder (None: the trainer's own results.json)
    head: str | None = None   # text tasks: the transformers head (HEADS), for exports and model cards
    output_flag: str | None = None   # a flag whose value joins the default output name (glue: --task_name)
    identifying_flag: str | None = None   # a flag only this trainer has: finds the task of a run.json without one
    script: Path | None = None       # the trainer script; default training/<name>.py

    def __post_init__(self):
        if self.script is None:
            object.__setattr__(self, "script", ROOT / "training" / f"{self.name}.py")

    @property
    def slug(self) -> str:
        """The name in folder names (outputs/<slug>-<method>): hyphens, as hub names have them."""
        return self.name.replace("_", "-")

    def default_output(self, method: str, flag_value: str | None = None) -> str:
        middle = f"-{flag_value}" if self.output_flag and flag_value else ""
        return f"{OUTPUTS_DIR}/{self.slug}{middle}-{method}"

    def output_help(self) -> str:
        """The default output as --help shows it."""
        middle = f"-<{self.output_flag}>" if self.output_flag else ""
        return f"{OUTPUTS_DIR}/{self.slug}{middle}-<method>"


DREAMBOOTH = TaskInfo("dreambooth", "image", "DreamBooth: a subject from 3-5 photos",
                      "--pretrained_model_name_or_path", scorer="eval.subject", identifying_flag="instance_prompt")
SEMANTIC_MAP = TaskInfo("semantic_map", "image", "semantic map (or canny / shuffle) to image",
                        "--pretrained_model_name_or_path", scorer="eval.segmentation",
                        identifying_flag="conditioning_image_column")
GLUE = TaskInfo("glue", "text", "GLUE-style classification and the tweet tasks", "--model_name_or_path",
                scorer=None, head="classification", output_flag="task_name", identifying_flag="task_name")
INSTRUCT = TaskInfo("instruct", "text", "instruction tuning with a multiple-choice evaluation",
                    "--model_name_or_path", scorer=None, head="causal", identifying_flag="mc_file")

TASKS = {t.name: t for t in (DREAMBOOTH, SEMANTIC_MAP, GLUE, INSTRUCT)}


def task_named(name: str | None) -> TaskInfo | None:
    """The task of a name as any version wrote it: run.json said 'semantic-map' before the registry."""
    return TASKS.get(str(name or "").replace("-", "_"))


def task_of(run: dict) -> TaskInfo | None:
    """The task a run folder's run.json was trained by: its "task", else (runs older than that field) the
    flag only that trainer has; None when neither says."""
    found = task_named(run.get("task"))
    if found is not None:
        return found
    args = run.get("args") if isinstance(run.get("args"), dict) else {}
    return next((t for t in TASKS.values() if t.identifying_flag in args), None)
