"""GLUE and instruction data through `datasets` (--dataset_name: a save_to_disk folder, a folder of parquet files;
--train_file: parquet and JSON lists), bad sources, and language adapters leaving the tool: peft's format on a
fresh transformers model and a merged transformers folder, each giving the adapted model's logits."""
import json

import datasets
import pytest
import torch

from lowrank import load_adapter
from tests.stderr import one_error_line
from training import glue, instruct
from training.export import main as export_cli
from training.text import glue_data as G
from training.text import instruct_data as I
from training.text.language import load_language_model


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path_factory.getbasetemp() / "lowrank-cache"))


def glue_rows():
    lines = (G.EXAMPLE_DIR / "train.tsv").read_text().splitlines()[1:41]
    return [{"sentence": s, "label": int(y)} for s, y in (line.split("\t") for line in lines)]


def write_glue(root, fmt):
    rows = glue_rows()
    parts = {"train": rows[:24], "validation": rows[24:]}
    if fmt == "save_to_disk":
        datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in parts.items()}).save_to_disk(str(root))
    else:   # the hub's layout of a parquet dataset: one file per split, named by it
        root.mkdir(parents=True)
        for k, v in parts.items():
            datasets.Dataset.from_list(v).to_parquet(str(root / f"{k}.parquet"))
    return root, parts


@pytest.mark.parametrize("fmt", ["save_to_disk", "parquet"])
def test_glue_dataset_name_reads_the_train_and_validation_splits(tmp_path, fmt):
    root, parts = write_glue(tmp_path / fmt, fmt)
    train, val = G.load_dataset_name(G.TASKS["sst2"], str(root), cache_dir=str(tmp_path / "cache"))
    assert train.texts == [r["sentence"] for r in parts["train"]] and train.labels == [r["label"]
                                                                                       for r in parts["train"]]
    assert val.texts == [r["sentence"] for r in parts["validation"]] and len(val) == 16


def test_glue_train_file_as_parquet_and_json_list_equals_the_tsv(tmp_path):
    rows = glue_rows()
    (tmp_path / "t.tsv").write_text("sentence\tlabel\n" + "".join(f"{r['sentence']}\t{r['label']}\n" for r in rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "t.parquet"))
    (tmp_path / "t.json").write_text(json.dumps(rows))
    want = G.examples_from_rows(G.read_rows(tmp_path / "t.tsv"), tmp_path / "t.tsv", G.TASKS["sst2"])
    for name in ("t.parquet", "t.json"):
        got = G.examples_from_rows(G.read_rows(tmp_path / name), tmp_path / name, G.TASKS["sst2"])
        assert (got.texts, got.labels) == (want.texts, want.labels), name


def test_glue_trains_from_a_dataset_folder(tmp_path):
    root, _ = write_glue(tmp_path / "sst2", "save_to_disk")
    out = tmp_path / "run"
    assert glue.main(["--model_name_or_path", "tiny-bert", "--dataset_name", str(root), "--task_name", "sst2",
                      "--output_dir", str(out), "--max_train_steps", "2", "--train_batch_size", "8", "--seed", "0",
                      "--report_to", "none"]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["dataset"] == str(root) and info["train_examples"] == 24


def alpaca_rows():
    return [json.loads(line) for line in I.EXAMPLE_INSTRUCTIONS.read_text().splitlines()]


def test_instruct_rows_from_parquet_and_a_saved_dataset_equal_the_jsonl(tmp_path):
    rows = alpaca_rows()
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert I.instruction_rows(str(tmp_path / "a.parquet")) == rows
    assert I.instruction_rows(str(tmp_path / "saved"), "--dataset_name") == rows



def test_bad_language_sources_are_one_error_line_naming_the_flag(tmp_path, capsys):
    root, _ = write_glue(tmp_path / "sst2", "save_to_disk")
    datasets.Dataset.from_list([{"prompt": "x", "completion": "y"}]).save_to_disk(str(tmp_path / "notalpaca"))
    base = ["--model_name_or_path", "tiny-bert", "--max_train_steps", "1", "--report_to", "none"]
    cases = [(glue, ["--dataset_name", str(root), "--text_column", "text"], ["--text_column", "'text'"]),
             (glue, ["--dataset_name", str(tmp_path / "nope")], ["--dataset_name", "does not exist"]),
             (glue, ["--dataset_name", str(root), "--train_file", str(tmp_path / "x.tsv"),
                     "--validation_file", str(tmp_path / "x.tsv")], ["--dataset_name", "not both"]),
             (instruct, ["--dataset_name", str(tmp_path / "notalpaca")], ["--dataset_name", "no instruction"])]
    for i, (trainer, argv, words) in enumerate(cases):
        out = tmp_path / f"out{i}"
        capsys.readouterr()
        assert trainer.main([*(base if trainer is glue else base[2:]), "--output_dir", str(out), *argv]) == 2
        line = one_error_line(capsys)
        assert all(w in line for w in words), line
        assert not out.exists()


def logits(model, batch):
    with torch.no_grad():
        return model.eval()(**batch).logits


def test_an_instruct_adapter_leaves_as_peft_and_as_a_merged_model(tmp_path):
    """peft: PeftModel.from_pretrained on a fresh tiny LLaMA; merged: AutoModelForCausalLM.from_pretrained(DIR).
    Both give the adapted model's logits (float32; merging re-associates W0 x + ΔW x as (W0 + ΔW) x, a few
    ulps per layer on logits of order 1: 1e-5 bounds it)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    datasets.Dataset.from_list(alpaca_rows()).to_parquet(str(tmp_path / "alpaca.parquet"))
    run = tmp_path / "run"
    assert instruct.main(["--train_file", str(tmp_path / "alpaca.parquet"), "--output_dir", str(run), "--seed", "0",
                          "--method", "delora", "--learning_rate", "1e-2", "--max_train_steps", "3",
                          "--checkpointing_steps", "100", "--report_to", "none"]) == 0
    ours, tok = load_language_model("tiny-llama", "causal")
    load_adapter(ours, run)
    batch = tok(["Give three tips for staying healthy.", "Bonjour"], return_tensors="pt", padding=True)
    want = logits(ours, batch)
    assert not torch.allclose(want, logits(load_language_model("tiny-llama", "causal")[0], batch), atol=1e-4)

    assert export_cli([str(run), "--format", "peft", "--output", str(tmp_path / "peft")]) == 0
    fresh, _ = load_language_model("tiny-llama", "causal")
    torch.testing.assert_close(logits(PeftModel.from_pretrained(fresh, tmp_path / "peft"), batch), want,
                               rtol=1e-5, atol=1e-5)
    assert export_cli([str(run), "--format", "merged", "--output", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(merged, batch), want, rtol=1e-5, atol=1e-5)


def test_a_glue_adapter_leaves_as_a_merged_classifier_with_its_head(tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root, _ = write_glue(tmp_path / "sst2", "parquet")
    run = tmp_path / "run"
    assert glue.main(["--model_name_or_path", "tiny-bert", "--dataset_name", str(root), "--output_dir", str(run),
                      "--cache_dir", str(tmp_path / "cache"), "--method", "lora", "--learning_rate", "1e-2",
                      "--max_train_steps", "3", "--seed", "0", "--train_batch_size", "8", "--report_to", "none"]) == 0
    ours, tok = load_language_model("tiny-bert", "classification", num_labels=2)
    load_adapter(ours, run)
    out = tmp_path / "merged"
    assert export_cli([str(run), "--format", "merged", "--output", str(out)]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(out)
    batch = AutoTokenizer.from_pretrained(out)(["a good film", "not a good film at all"], return_tensors="pt",
                                               padding=True)
    torch.testing.assert_close(logits(merged, batch), logits(ours, batch), rtol=1e-5, atol=1e-5)
    # an occupied folder and an SD-only request are refused in one line
    assert export_cli([str(run), "--format", "merged", "--output", str(out)]) == 2
    assert "not empty" in one_error_line(capsys)
