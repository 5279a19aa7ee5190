"""Model cards (README.md with YAML front matter, as diffusers' training scripts write them) in finished run
folders and in exports; the front matter is parsed here with yaml.safe_load, independently of our reader."""
import json
import re

import pytest
import yaml

import lowrank
from lowrank.analysis import delora_bound
from training import dreambooth, glue
from training.common.model_card import base_license, model_card
from training.exporting import export_run

FAST = ["--max_train_steps", "3", "--checkpointing_steps", "2", "--seed", "0", "--resolution", "32",
        "--num_inference_steps", "2", "--num_validation_images", "2", "--rank", "4", "--report_to", "none"]


def card(folder):
    text = (folder / "README.md").read_text(encoding="utf-8")
    m = re.match(r"---\n(.*?)\n---\n", text, flags=re.S)
    assert m, text[:200]
    return yaml.safe_load(m.group(1)), text[m.end():]


@pytest.fixture(scope="module")
def db_run(tmp_path_factory, tiny_cache):
    out = tmp_path_factory.mktemp("db") / "dog-delora"
    assert dreambooth.main(["--output_dir", str(out), "--method", "delora", *FAST]) == 0
    return out


def test_dreambooth_run_folder_has_a_card(db_run):
    meta, body = card(db_run)
    run = json.loads((db_run / "run.json").read_text())
    assert meta["base_model"] == "tiny" and meta["library_name"] == "diffusers"
    assert {"lowrank", "delora", "text-to-image", "diffusers", "lora"} <= set(meta["tags"])
    assert meta["instance_prompt"] == run["args"]["instance_prompt"]
    assert "license" not in meta   # the tiny test model has none: never invented
    assert "](samples_grid.png)" in body and (db_run / "samples_grid.png").is_file()
    # the distance reached and DeLoRA's bound, as the run's own files say; the bound holds
    last = [json.loads(x) for x in (db_run / "metrics.jsonl").read_text().splitlines()][-1]
    _, state = lowrank.read_adapter(db_run)
    bound = delora_bound(state, run["fig3_layer"])
    assert 0 < last["distance_fig3"] <= bound
    assert f"{last['distance_fig3']:.4g}" in body and f"{bound:.4g}" in body
    for loader in ("load_lora_weights", "ComfyUI", "PeftModel.from_pretrained"):
        assert loader in body


def test_export_folders_have_a_card(db_run, tmp_path):
    written = export_run(db_run, tmp_path / "dog-kohya", "kohya")
    meta, body = card(tmp_path / "dog-kohya")
    assert meta["base_model"] == "tiny" and "delora" in meta["tags"]
    assert "`dog-kohya.safetensors`" in body and written.name == "dog-kohya.safetensors"
    assert (tmp_path / "dog-kohya" / "samples_grid.png").is_file()   # the card's image travels with it
    ckpt = sorted(db_run.glob("checkpoint-*"))[0]
    export_run(ckpt, tmp_path / "ckpt-peft", "peft")
    meta, body = card(tmp_path / "ckpt-peft")
    assert f"{db_run.name}/{ckpt.name}" in body and "'ckpt-peft'" in body   # peft snippet loads this folder


def test_license_comes_from_the_base_model_only(db_run, tmp_path):
    run = json.loads((db_run / "run.json").read_text())
    for base, want in (("stable-diffusion-v1-5/stable-diffusion-v1-5", "creativeml-openrail-m"),
                       ("some-user/private-model", None)):
        run["args"]["pretrained_model_name_or_path"] = base
        (tmp_path / "run.json").write_text(json.dumps(run))
        text = model_card(tmp_path, tmp_path)
        meta = yaml.safe_load(text.split("---\n")[1])
        assert meta.get("license") == want and meta["base_model"] == base
    local = tmp_path / "local-base"
    local.mkdir()
    (local / "README.md").write_text("---\nlicense: mit\nlibrary_name: diffusers\n---\n# a base\n")
    assert base_license(str(local)) == "mit" and base_license(str(tmp_path / "none")) is None


def test_glue_run_card_follows_peft_conventions(tmp_path):
    out = tmp_path / "glue"
    assert glue.main(["--method", "delora", "--model_name_or_path", "tiny-bert", "--max_train_steps", "2",
                      "--output_dir", str(out), "--num_threads", "1"]) == 0
    meta, body = card(out)
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-classification"
    assert meta["base_model"] == "tiny-bert" and {"lowrank", "delora", "glue"} <= set(meta["tags"])
    final = json.loads((out / "results.json").read_text())["train_info"]["final"]
    assert final and all(f"{k} {v:.4f}" in body for k, v in final.items() if isinstance(v, float))
    assert "AutoModelForSequenceClassification" in body and "PeftModel.from_pretrained" in body
