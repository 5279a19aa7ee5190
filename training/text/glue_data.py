"""GLUE: the tasks, their metrics, the split protocol and the data files.

Tasks (GLUE's own columns as nyu-mll/glue names them; metric as the GLUE leaderboard reports it):
    cola  sentence                  2 labels     Matthews correlation
    sst2  sentence                  2 labels     accuracy
    mrpc  sentence1, sentence2      2 labels     accuracy and F1 (positive class 1: paraphrase)
    qqp   question1, question2      2 labels     accuracy and F1 (positive class 1: duplicate)
    stsb  sentence1, sentence2      score 0..5   Pearson and Spearman (regression on the single logit)
    mnli  premise, hypothesis       3 labels     accuracy on validation_matched
    qnli  question, sentence        2 labels     accuracy
    rte   sentence1, sentence2      2 labels     accuracy
The first metric of each task is the one checkpoints are selected by (for MRPC/QQP and STS-B: the mean of the two,
as the DeLoRA/RED tables average them).

The split protocol (RED, Wu et al. 2024, used by DeLoRA's official GLUE script): GLUE's test labels are private,
so the public validation set is permuted with the run's seed and cut into a tuning part (MNLI, QNLI, QQP: the
first 1,000; the others: the first half) and a test part (the rest). Each epoch is scored on the tuning part;
the reported number is the test part at the best tuning epoch.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ground import runfolder
from training.common import TrainingError, hfdata


@dataclass(frozen=True)
class GlueTask:
    name: str
    text: str
    pair: str | None
    labels: tuple[str, ...]          # label names, index = class id; () for regression
    metrics: tuple[str, ...]
    validation_split: str = "validation"

    @property
    def num_labels(self) -> int:
        return len(self.labels) or 1

    @property
    def is_regression(self) -> bool:
        return not self.labels


TASKS = {t.name: t for t in [
    GlueTask("cola", "sentence", None, ("unacceptable", "acceptable"), ("matthews",)),
    GlueTask("sst2", "sentence", None, ("negative", "positive"), ("accuracy",)),
    GlueTask("mrpc", "sentence1", "sentence2", ("not_equivalent", "equivalent"), ("accuracy", "f1")),
    GlueTask("qqp", "question1", "question2", ("not_duplicate", "duplicate"), ("accuracy", "f1")),
    GlueTask("stsb", "sentence1", "sentence2", (), ("pearson", "spearman")),
    GlueTask("mnli", "premise", "hypothesis", ("entailment", "neutral", "contradiction"), ("accuracy",),
             "validation_matched"),
    GlueTask("qnli", "question", "sentence", ("entailment", "not_entailment"), ("accuracy",)),
    GlueTask("rte", "sentence1", "sentence2", ("entailment", "not_entailment"), ("accuracy",)),
]}
LARGE_TASKS = ("mnli", "qnli", "qqp")   # tuning part of 1,000 examples; the others: half the validation set
TUNING_SIZE_LARGE = 1000

# Column names of GLUE's original TSV files, tried after the task's own names (MRPC's '#1 String', MNLI's
# 'gold_label', STS-B's 'score', QQP's 'is_duplicate'): the files from gluebenchmark.com load as they are.
TSV_ALIASES = {"sentence1": ["#1 String"], "sentence2": ["#2 String"], "premise": ["sentence1"],
               "hypothesis": ["sentence2"], "label": ["gold_label", "score", "is_duplicate", "Quality"]}


# ----- metrics ---------------------------------------------------------------------------------------------
def accuracy(pred, ref) -> float:
    pred, ref = np.asarray(pred), np.asarray(ref)
    return float((pred == ref).mean())


def f1(pred, ref, positive: int = 1) -> float:
    pred, ref = np.asarray(pred) == positive, np.asarray(ref) == positive
    tp = float((pred & ref).sum())
    denom = float(pred.sum() + ref.sum())
    return 2 * tp / denom if denom else 0.0


def macro_f1(pred, ref) -> float:
    """Unweighted mean of the per-class F1 over the classes present in the references or the predictions
    (scikit-learn's f1_score(average="macro"))."""
    classes = np.union1d(np.asarray(pred), np.asarray(ref))
    return float(np.mean([f1(pred, ref, positive=k) for k in classes]))


def matthews(pred, ref) -> float:
    """Matthews correlation, multiclass form (Gorodkin 2004; sklearn's matthews_corrcoef):
    (c·s − Σ p_k t_k) / sqrt((s² − Σ p_k²)(s² − Σ t_k²)); 0 when a side is constant."""
    pred, ref = np.asarray(pred), np.asarray(ref)
    classes = np.union1d(pred, ref)
    t = np.array([(ref == k).sum() for k in classes], dtype=np.float64)
    p = np.array([(pred == k).sum() for k in classes], dtype=np.float64)
    c, s = float((pred == ref).sum()), float(len(ref))
    denom = math.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((c * s - p @ t) / denom) if denom else 0.0


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (what Spearman's rho needs)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def pearson(pred, ref) -> float:
    x, y = np.asarray(pred, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y / denom) if denom else 0.0


def spearman(pred, ref) -> float:
    return pearson(_ranks(np.asarray(pred, dtype=np.float64)), _ranks(np.asarray(ref, dtype=np.float64)))


METRICS = {"accuracy": accuracy, "f1": f1, "macro_f1": macro_f1, "matthews": matthews, "pearson": pearson,
           "spearman": spearman}


def score(task: GlueTask, outputs: np.ndarray, refs) -> dict[str, float]:
    """The task's metrics from model outputs ((n, num_labels) logits) and references; 'score' is the
    selection score (the mean of the task's metrics)."""
    pred = outputs[:, 0] if task.is_regression else outputs.argmax(axis=1)
    result = {m: METRICS[m](pred, refs) for m in task.metrics}
    result["score"] = float(np.mean([result[m] for m in task.metrics]))
    return result


# ----- the split protocol ----------------------------------------------------------------------------------
def split_validation(n: int, task_name: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(tuning indices, test indices) of an n-example validation set: a permutation from `seed` (numpy's
    default_rng), cut at 1,000 for MNLI/QNLI/QQP and at n // 2 otherwise. Disjoint, covering, deterministic."""
    if n < 2:
        raise TrainingError(f"the validation set has {n} example(s); the tuning/test split needs at least 2")
    perm = np.random.default_rng(seed).permutation(n)
    cut = min(TUNING_SIZE_LARGE, n // 2) if task_name in LARGE_TASKS else n // 2
    return np.sort(perm[:cut]), np.sort(perm[cut:])


# ----- data ------------------------------------------------------------------------------------------------
@dataclass
class Examples:
    texts: list[str]
    pairs: list[str] | None
    labels: list          # int class ids or float scores

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx) -> "Examples":
        idx = [int(i) for i in idx]
        return Examples([self.texts[i] for i in idx], [self.pairs[i] for i in idx] if self.pairs else None,
                        [self.labels[i] for i in idx])


def read_rows(path: Path) -> list[dict]:
    """Rows of a .tsv (GLUE's layout: tab-separated, header line, no quoting), .csv (header line), .jsonl / .json
    (JSON lines or a JSON list) or .parquet file (read by `datasets`, as transformers' run_glue.py does)."""
    if not path.is_file():
        raise TrainingError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        rows = hfdata.pick_split(hfdata.load_splits(str(path), "data file"), "train", str(path)).to_list()
        return rows
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TrainingError(f"cannot read {path}: {e}") from None
    if suffix == ".json" and text.lstrip().startswith("["):   # a JSON list of objects
        try:
            rows = json.loads(text)
        except ValueError as e:
            raise TrainingError(f"{path} is not valid JSON: {e}") from None
        if not all(isinstance(r, dict) for r in rows):
            raise TrainingError(f"{path} must be a JSON list of objects (one per example)")
    elif suffix in (".jsonl", ".json"):
        rows, bad = runfolder.parse_jsonl(text)
        if bad:
            raise TrainingError(f"{path} line {bad[0][0]} is not a JSON object")
    elif suffix in (".tsv", ".csv"):
        kw = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if suffix == ".tsv" else {}
        rows = list(csv.DictReader(text.splitlines(), **kw))
    else:
        raise TrainingError(f"{path}: unknown data file type {suffix!r}; use .tsv (GLUE layout), .csv, .jsonl or "
                            f".parquet")
    if not rows:
        raise TrainingError(f"{path} has no examples")
    return rows


def _column(rows: list[dict], path: Path, wanted: str, given: bool) -> str:
    names = [wanted] if given else [wanted, *TSV_ALIASES.get(wanted, [])]
    found = next((n for n in names if n in rows[0]), None)
    if found is None:
        raise TrainingError(f"{path} has no column {wanted!r} (columns: {', '.join(map(str, rows[0]))}); name it "
                            f"with --{'label' if wanted == 'label' else 'text'}_column flags")
    return found


def examples_from_rows(rows: list[dict], path: Path, task: GlueTask, text_column: str | None = None,
                       pair_column: str | None = None, label_column: str | None = None) -> Examples:
    """Examples of `task` from file rows; labels as class ids (names or integers accepted) or float scores."""
    text = _column(rows, path, text_column or task.text, text_column is not None)
    pair_name = pair_column or task.pair
    pair = _column(rows, path, pair_name, pair_column is not None) if pair_name else None
    label = _column(rows, path, label_column or "label", label_column is not None)
    texts, pairs, labels = [], [] if pair else None, []
    for i, row in enumerate(rows, 1):
        value = row.get(label)
        if task.is_regression:
            try:
                y = float(value)
            except (TypeError, ValueError):
                raise TrainingError(f"{path} example {i}: label {value!r} is not a number ({task.name} scores "
                                    f"similarity 0..5)") from None
            if not math.isfinite(y):
                raise TrainingError(f"{path} example {i}: label {value!r} is not finite")
        else:
            y = task.labels.index(value) if value in task.labels else None
            if y is None:
                try:
                    y = int(str(value).strip())
                except ValueError:
                    y = -1
            if not 0 <= y < task.num_labels:
                raise TrainingError(f"{path} example {i}: label {value!r} is out of range; {task.name} has labels "
                                    f"0..{task.num_labels - 1} ({', '.join(task.labels)})")
        texts.append(str(row.get(text) or ""))
        if pairs is not None:
            pairs.append(str(row.get(pair) or ""))
        labels.append(y)
    return Examples(texts, pairs, labels)


def load_local(task: GlueTask, train_file: str, validation_file: str, **columns) -> tuple[Examples, Examples]:
    train_path, val_path = Path(train_file).expanduser(), Path(validation_file).expanduser()
    train = examples_from_rows(read_rows(train_path), train_path, task, **columns)
    val = examples_from_rows(read_rows(val_path), val_path, task, **columns)
    return train, val


def load_dataset_name(task: GlueTask, name: str, config: str | None = None, cache_dir: str | None = None,
                      **columns) -> tuple[Examples, Examples]:
    """--dataset_name: the 'train' and validation splits (MNLI: validation_matched) of a `datasets` source: a
    local save_to_disk folder, a folder of parquet/JSON/CSV files named by split (train.parquet,
    validation.parquet, ...), or a hub name (training/common/hfdata.py), as transformers' run_glue.py reads it."""
    what = f"--dataset_name {name}"
    splits = hfdata.load_splits(name, "--dataset_name", config, cache_dir)
    out = []
    for split in ("train", task.validation_split):
        if split not in splits and split == task.validation_split and "validation" in splits:
            split = "validation"
        table = hfdata.pick_split(splits, split, what)
        out.append(examples_from_rows(table.to_list(), Path(f"{name} ({split} split)"), task, **columns))
    return out[0], out[1]


def load_hub(task: GlueTask) -> tuple[Examples, Examples]:
    """nyu-mll/glue through `datasets` (needs the package and the hub)."""
    try:
        import datasets
    except ImportError:
        raise TrainingError(f"--task_name {task.name} without --train_file needs the `datasets` package and the hub; "
                            f"pip install datasets, or give --train_file and --validation_file (GLUE TSV, CSV "
                            f"or JSONL)") from None
    try:
        ds = datasets.load_dataset("nyu-mll/glue", task.name)
    except Exception as e:   # offline, no cache, hub errors: all mean "use local files"
        raise TrainingError(f"cannot load nyu-mll/glue {task.name} from the hub ({type(e).__name__}); give "
                            f"--train_file and --validation_file instead") from None

    def convert(split) -> Examples:
        return Examples(list(split[task.text]), list(split[task.pair]) if task.pair else None, list(split["label"]))
    return convert(ds["train"]), convert(ds[task.validation_split])


EXAMPLE_DIR = Path(__file__).resolve().parent.parent / "data" / "glue_example"
EXAMPLE_TASK = "sst2"   # the embedded set is a binary sentence classification in SST-2's layout
