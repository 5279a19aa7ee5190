"""What the robustness study trains: the tasks it runs on (each is its trainer script, the scores it reports and
how to get them from a finished run folder, how to load its base model for the weight-norm analysis, and its
base learning rates) and the rows of DeLoRA's Table 1 (the ablation study).

Adding a task = one entry in TASKS. A score function returns ({score name: value}, note): values are what
was measured, or absent with a note saying why (no metric model, nothing to read); never a made-up number.
"""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ground.cli import error_line
from ground.runfolder import RESULTS, read_eval, read_json, read_run, run_setting
from lowrank import METHODS
from training.common.tasks import DREAMBOOTH, GLUE, SEMANTIC_MAP, TaskInfo
from training.families import family_of
from training.text import language
from training.text.tweet_data import TWEET_TASKS, tweet_learning_rate

from . import EvalError
from .embed import CLIP_MODEL, DINO_MODEL, ClipEmbedder, DinoEmbedder, resolve_device

ROOT = Path(__file__).resolve().parent.parent
# Table 1 (DeLoRA), top to bottom: (row, ΔW as printed, method, trainer flags)
ABLATION_ROWS = [
    ("V1 LoRA [rank-r]", "BA", "lora", []),
    ("V2 + normalize w/ controllable boundary", "(λ/r) BΞA", "delora", ["--delora_norm", "none"]),
    ("V3 + weight-scaling (DeLoRA)", "(λ‖W‖/r) BΞA", "delora", []),
    ("V5 ↑ + controllable scale + high rank + relaxed", "(λ/r)(BΞA − DΦC) W", "mult_relaxed", []),
    ("V6 + controllable boundary + high rank", "(λ/r)(UΣUᵀ − VΘVᵀ) W", "mult_highrank", []),
    ("V7 + controllable boundary", "λ(uuᵀ − vvᵀ) W (λ/2 per term, Eq. 10)", "mult_bounded", []),
    ("V8 ETHER+ (one-side) [rank-2, boundary 2]", "(uuᵀ − vvᵀ) W", "etherplus", ["--etherplus_one_sided"]),
]


@dataclass
class StudyTask:
    task: TaskInfo                 # the registry's task (name, trainer script, base-model flag)
    score_names: tuple[str, ...]
    score: Callable                # (run folder, args, step) -> ({name: value}, note)
    load_base: Callable            # (model name or path) -> nn.Module with the adapted layers' base weights
    prepare: Callable | None = None   # (args) -> note: checks before the sweep (e.g. metric models load)
    defaults: dict = field(default_factory=dict)   # the study's flags this task sizes differently
    long_flags: tuple[str, ...] = ()               # trainer flags of the prolonged runs only
    base_lr_of: Callable | None = None             # (method, trainer flags) -> the task's base rate, or None

    def base_lr(self, method: str, passthrough: list[str], given: dict[str, float] | None = None) -> float:
        """The study's base rate of `method`: --base_lrs (`given`), else the task's, else the method's default."""
        if given and given.get(method):
            return given[method]
        rate = self.base_lr_of(method, passthrough) if self.base_lr_of is not None else None
        return rate if rate is not None else METHODS[method].default_learning_rate

    @property
    def name(self) -> str:
        return self.task.name

    @property
    def script(self) -> Path:
        return self.task.script

    @property
    def model_flag(self) -> str:
        return self.task.model_flag

    def check(self) -> None:
        if not self.script.is_file():
            shown = self.script.relative_to(ROOT) if self.script.is_relative_to(ROOT) else self.script
            raise EvalError(f"--task {self.name}: its trainer {shown} does not exist in this installation; choose "
                            f"another --task")


# ----- DreamBooth: DINO, CLIP-I and drift through eval.subject ---------------------------------------------------
def prepare_subject(args) -> str | None:
    """Load the metric models once before the sweep: if they cannot load (offline, no local folder), every
    run's scores are unavailable for the same reason, said once, instead of failing run by run."""
    args.dino_model, args.clip_model = args.dino_model or DINO_MODEL, args.clip_model or CLIP_MODEL
    device, failed = resolve_device("auto"), []
    for embedder, name in ((DinoEmbedder, args.dino_model), (ClipEmbedder, args.clip_model)):
        try:   # both tried, so one line names every flag to pass (offline is found once: the second fails at once)
            embedder(name, device, 1)
        except Exception as e:   # any loading failure means the same thing here: no scores
            failed.append((str(e).splitlines() or [type(e).__name__])[0][:300])
    return f"scores unavailable: the metric models did not load ({'; '.join(failed)})" if failed else None


DRIFT_BASE = "drift-base"   # OUTPUT_DIR/drift-base: the base model's drift images, made once for the study


def score_subject(folder: Path, args, step: int) -> tuple[dict, str]:
    """DINO, CLIP-I and drift of the run's last adapter (eval.subject: generates, scores, appends RUN/eval.jsonl;
    a step already scored with the same models and drift prompts is read back, not recomputed). The base model's
    drift images are shared by the study's runs: OUTPUT_DIR/drift-base, made by the first run scored and reused
    by every run of the same base model and settings."""
    drift_prompts = getattr(args, "drift_prompts", 0)

    def scored():
        return next((r for r in read_eval(folder) if r.get("step") == step and r.get("dino_model") == args.dino_model
                     and r.get("clip_model") == args.clip_model
                     and (not drift_prompts or r.get("drift_prompts") == drift_prompts)), None)
    row = scored()
    if row is None:
        cmd = [sys.executable, "-m", "eval.subject", "--run_dir", str(folder), "--checkpoints", str(step),
               "--dino_model", args.dino_model, "--clip_model", args.clip_model, "--max_prompts",
               str(args.max_prompts), "--images_per_prompt", str(args.images_per_prompt),
               "--drift_prompts", str(drift_prompts), "--drift_base_dir", str(args.output_dir / DRIFT_BASE)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        row = scored()
        if proc.returncode != 0 or row is None:
            return {}, f"scoring failed: {(error_line(proc.stderr.splitlines()) or 'no output')[:200]}"
    drift = {"drift": row["drift"]} if drift_prompts and row.get("drift") is not None else {}
    return {"dino": row["dino"], "clip_i": row["clip_i"], **drift}, ""


def load_denoiser(name: str | None):
    """The model the adapters go into (the UNet, or a FLUX family's transformer), loaded without the pipeline's
    other parts where its folder is on this machine: weight norms and bounds need the denoiser alone, and
    FLUX.2-klein-base-4B's text encoder alone is another 4B parameters."""
    family = family_of(name)
    folder = family.local_folder(name)
    index = Path(folder) / "model_index.json" if folder else None
    parts = read_json(index, default={}) if index and index.is_file() else {}
    others = {k: None for k, v in parts.items()
              if not k.startswith("_") and isinstance(v, list) and k != family.denoiser_name}
    return family.denoiser(family.load(name, **others))


# ----- semantic map: mIoU through eval.segmentation ----------------------------------------------------------
def score_segmentation(folder: Path, args, step: int) -> tuple[dict, str]:
    row = next((r for r in read_eval(folder) if r.get("step") == step and r.get("miou") is not None), None)
    if row is None:
        cmd = [sys.executable, "-m", "eval.segmentation", "--run_dir", str(folder), "--checkpoints", str(step)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        row = next((r for r in read_eval(folder) if r.get("step") == step and r.get("miou") is not None), None)
        if row is None:
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()] or ["no output"]
            return {}, f"scoring failed: {lines[-1][:200]}"
    return {"miou": row["miou"]}, ""


# ----- GLUE: the trainer's own evaluation (RUN/results.json) -------------------------------------------------
GLUE_METRICS = ("accuracy", "matthews_correlation", "pearson", "spearmanr", "f1")


def _find_metric(data) -> tuple[str, float] | None:
    """The first task metric in results.json, wherever the trainer nests it (peft's method-comparison shape
    keeps them under train_info/metrics)."""
    if isinstance(data, dict):
        for key in GLUE_METRICS:
            for k, v in data.items():
                if k.split("/")[-1].removeprefix("eval_") == key and isinstance(v, (int, float)):
                    return key, float(v)
        for v in data.values():
            found = _find_metric(v)
            if found:
                return found
    if isinstance(data, list):
        for v in reversed(data):   # the last evaluation
            found = _find_metric(v)
            if found:
                return found
    return None


GLUE_SCORES = ("accuracy", "f1", "macro_f1", "matthews", "pearson", "spearman")


def score_glue(folder: Path, args, step: int) -> tuple[dict, str]:
    """training/glue.py's own numbers: the test part's metrics at the best tuning epoch (train_info.final) and
    that epoch's tuning score; for another trainer's results.json, its first task metric as `metric`."""
    data = read_json(folder / RESULTS, default=None)
    info = data.get("train_info", {}) if isinstance(data, dict) else {}
    final = info.get("final")
    if isinstance(final, dict) and final:
        scores = {k: float(v) for k, v in final.items() if k in GLUE_SCORES}
        tune = (info.get("final_tune") or {}).get("score")
        if tune is not None:
            scores["tune_score"] = float(tune)
        return scores, "test part at the best tuning epoch"
    found = _find_metric(data)
    if found is None:
        return {}, f"no task metric in {RESULTS}"
    return {"metric": found[1]}, f"metric = {found[0]}"


def flag_value(passthrough: list[str], flag: str) -> str | None:
    for i, a in enumerate(passthrough):
        if a == flag and i + 1 < len(passthrough):
            return passthrough[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def glue_base_lr(method: str, passthrough: list[str]) -> float | None:
    """The tweet tasks' tuned rates (training.text.tweet_data); None for other GLUE data (the method's default)."""
    return tweet_learning_rate(method) if flag_value(passthrough, "--task_name") in TWEET_TASKS else None


def load_language_model(name: str | None):
    """The base encoder through the trainer's own loader, so presets ('minilm', the default) load offline."""
    model, _ = language.load_language_model(name or language.MINILM, "classification", num_labels=2)
    return model


# the tasks a study can sweep (instruction tuning has no study score yet), keyed by the registry's names
TASKS = {s.name: s for s in (
    StudyTask(DREAMBOOTH, ("dino", "clip_i", "drift"), score_subject, load_denoiser, prepare=prepare_subject),
    StudyTask(SEMANTIC_MAP, ("miou",), score_segmentation, load_denoiser),
    StudyTask(GLUE, GLUE_SCORES + ("metric",), score_glue, load_language_model, base_lr_of=glue_base_lr,
              defaults={"num_train_epochs": 2, "long_epochs": 8, "checkpointing_steps": 100},
              long_flags=("--lr_scheduler", "constant")),
)}


def base_model_name(task: StudyTask, passthrough: list[str], run_dirs: list[Path]) -> str | None:
    """The base model of the study: the trainer flag if given, else what a finished run recorded."""
    given = flag_value(passthrough, task.model_flag)
    if given:
        return given
    for d in run_dirs:
        try:
            name = run_setting(read_run(d), task.model_flag.lstrip("-"))
        except ValueError:
            continue
        if name:
            return name
    return None
