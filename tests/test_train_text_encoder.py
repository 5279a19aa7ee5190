"""DreamBooth --train_text_encoder (SD-1.5, SDXL), in-process through main(argv).

- a tiny SD run trains the text encoder's adapter (its own rank, learning rate and AdamW group) with the UNet's: the
  LoRA text adapter starts at B = 0, so step 1 sees the base conditioning and its loss is the UNet-only run's, bit
  for bit (same UNet init, same noise); from then on the prompts are encoded with the moved adapter and the runs
  part. Without the flag nothing of it exists (the golden adapter of tests/test_families.py holds those bits);
- a run killed after a checkpoint and resumed ends bit-identical, text encoder adapters included;
- exports: the run's diffusers file (unet.* and text_encoder.* keys) loaded by diffusers' load_lora_weights gives
  our text embeddings and UNet output (float64: the only error left is the float32 storage of the factors, bound
  1e-5 of the adapter's effect as tests/test_export.py); the kohya file's every key is mapped by ComfyUI's rules
  (tests/comfy_keys.py: model_lora_keys_unet and model_lora_keys_clip) and its LoRA rule gives our ΔW of every
  text encoder layer within the float32 bound of tests/test_export_sdxl_comfy.py;
- SDXL: both encoders (text_encoder/, text_encoder_2/; lora_te1_ / lora_te2_ for ComfyUI);
- FLUX.1 / FLUX.2-klein and bad values: one `error:` line, exit 2, nothing written.
"""
import copy
import json
import os

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

os.environ["HF_HUB_OFFLINE"] = "1"

import lowrank  # noqa: E402
from eval.generate import generate_images  # noqa: E402
from ground import runfolder  # noqa: E402
from tests import comfy_keys as comfy  # noqa: E402
from tests.family_runs import check_resume_after_a_kill, one_thread  # noqa: E402, F401 (a module fixture)
from tests.test_dreambooth import metrics, train  # noqa: E402
from tests.test_dreambooth_resume import ACCELERATE, SCRIPT, env, free_port, run  # noqa: E402, F401 (env: a fixture)
from tests.test_export_sdxl_comfy import Comfy, U, check_loadable  # noqa: E402
from tests.test_local_sources import photos, write_source  # noqa: E402
from tests.test_training_faults import same_adapter  # noqa: E402
from training.exporting import export_run  # noqa: E402
from training.families import load_pipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("tiny_cache")

TEXT = ["--train_text_encoder", "--text_encoder_rank", "2", "--text_encoder_lr", "1e-2"]
RUN = ["--method", "lora", "--max_train_steps", "3", "--num_validation_images", "1", "--skip_final_samples"]
PROMPT = "a photo of sks cat"   # the example subject's instance prompt


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(the SD run with --train_text_encoder, the same run without it)."""
    root = tmp_path_factory.mktemp("text-encoder")
    assert train(root / "text", *RUN, *TEXT) == 0
    assert train(root / "plain", *RUN) == 0
    return root / "text", root / "plain"


def token_ids(pipe, prompt=PROMPT):
    return pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids


def with_adapter(module, folder, dtype=torch.float64):
    """A copy of a pipeline part in `dtype` with the saved adapter of `folder` loaded."""
    model = copy.deepcopy(module).to(dtype)
    lowrank.load_adapter(model, folder)
    return model


def check_exact(got, ours, base, what):
    """Float64 evaluation: the export's only error is the float32 storage of its factors (~1e-7 of the effect)."""
    effect, diff = (ours - base).abs().max().item(), (got - ours).abs().max().item()
    assert effect > 1e-6, f"{what}: the adapter does (almost) nothing ({effect:.2e}); the test would prove nothing"
    assert diff <= 1e-5 * effect, f"{what}: max diff {diff:.2e} vs adapter effect {effect:.2e}"


def test_text_encoder_trains_beside_the_unet(runs):
    text, plain = runs
    a, b = metrics(text), metrics(plain)
    assert [r["step"] for r in a] == [1, 2, 3]
    # step 1: the text adapter is the identity (B = 0): the same conditioning, UNet init and noise as without it
    assert a[0]["loss"] == b[0]["loss"]
    assert a[1]["loss"] != b[1]["loss"] and a[2]["loss"] != b[2]["loss"]   # then the moved encoder conditions
    assert all(r["lr_text_encoder"] == 1e-2 and r["lr"] == b[0]["lr"] != 1e-2 for r in a)   # its own AdamW group
    full = a[-1]   # the last step's full probe: every adapted layer of both parts, names prefixed by the part
    te = {k: v for k, v in full.items() if k.startswith("distance/text_encoder.")}
    assert len(te) == 20 and all(v > 0 for v in te.values())   # 5 layers x q, k, v, out_proj, every one moved
    unet_layers = sum(k.startswith("distance/") for k in metrics(plain)[-1])
    assert sum(k.startswith("distance/unet.") for k in full) == unet_layers == 48

    info = json.loads((text / runfolder.RUN_JSON).read_text())["text_encoder"]
    assert info == {"parts": ["text_encoder"], "rank": 2, "alpha": 2.0, "learning_rate": 1e-2,
                    "target_modules": ["q_proj", "k_proj", "v_proj", "out_proj"],
                    "adapted_layers": {"text_encoder": 20}}
    assert "text_encoder" not in json.loads((plain / runfolder.RUN_JSON).read_text())
    card = (text / "README.md").read_text()
    assert "Text encoder trained" in card and "PeftModel.from_pretrained(pipe.text_encoder, 'PEFT_DIR/text_encoder')" \
        in card
    assert not (plain / "text_encoder").exists() and not (plain / "checkpoint-2" / "text_encoder").exists()
    for folder in (text, text / "checkpoint-2"):   # each part's adapter in its own folder, checkpoints too
        config, state = lowrank.read_adapter(folder / "text_encoder")
        assert config.rank == 2 and config.method == "lora" and config.target_modules == info["target_modules"]
        b_factors = [v for k, v in state.items() if k.endswith("lora_B")]
        assert len(b_factors) == 20 and all(v.shape[1] == 2 and v.abs().max() > 0 for v in b_factors)   # got grads
    assert lowrank.read_adapter(text)[0].target_modules == ["to_q", "to_k", "to_v", "to_out.0"]

    pipe = load_pipeline("tiny")
    with torch.no_grad():
        ids = token_ids(pipe)
        base = pipe.text_encoder(ids)[0]
        ours = with_adapter(pipe.text_encoder, text / "text_encoder", torch.float32)(ids)[0]
    assert (ours - base).abs().max() > 1e-3   # the prompt now encodes differently


def test_eval_samples_with_the_trained_text_encoder(runs, tmp_path):
    """eval's images of a run (eval.subject, drift, the robustness study) come from both of its adapters; the next
    run's replace them, text encoder included."""
    text, plain = runs
    pipe, reference = load_pipeline("tiny"), load_pipeline("tiny").text_encoder
    ids = token_ids(pipe)
    for run_dir, want in ((text, with_adapter(reference, text / "text_encoder", torch.float32)), (plain, reference)):
        generate_images(pipe, run_dir, [PROMPT], tmp_path / run_dir.name, images_per_prompt=1, num_inference_steps=1,
                        resolution=32)
        with torch.no_grad():
            assert torch.equal(pipe.text_encoder(ids)[0], want(ids)[0])


def test_exports_load_in_diffusers_and_comfyui(runs, tmp_path):
    text, _ = runs
    lora = load_file(str(text / "pytorch_lora_weights.safetensors"))   # the run's own --export_diffusers file
    assert {k.split(".")[0] for k in lora} == {"unet", "text_encoder"}
    assert sum(k.startswith("text_encoder.text_model.encoder.layers.") for k in lora) == 2 * 20

    pipe = load_pipeline("tiny").to(torch.float64)
    ids, g = token_ids(pipe), torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64), torch.tensor([10])
    text_model, unet = with_adapter(pipe.text_encoder, text / "text_encoder"), with_adapter(pipe.unet, text)
    with torch.no_grad():
        base_text, ours_text = pipe.text_encoder(ids)[0], text_model(ids)[0]
        base_out, ours_out = pipe.unet(x, t, ours_text).sample, unet(x, t, ours_text).sample
        pipe.load_lora_weights(str(text))
        check_exact(pipe.text_encoder(ids)[0], ours_text, base_text, "text_encoder/diffusers")
        check_exact(pipe.unet(x, t, ours_text).sample, ours_out, base_out, "unet/diffusers")

    written = export_run(text, tmp_path / "cat", "kohya")
    lora = load_file(str(written))
    fresh = load_pipeline("tiny")   # ComfyUI holds the plain base model
    sd = fresh.unet.state_dict()
    c = Comfy(sd, comfy.unet_config_of(sd))
    check_loadable(c)
    clip = comfy.clip_state_keys(fresh.text_encoder.state_dict(), "clip_l")
    key_map = {**c.key_map, **comfy.model_lora_keys_clip(clip)}
    patches, not_loaded = comfy.load_lora(lora, key_map)
    assert not not_loaded, f"ComfyUI: lora key not loaded: {sorted(not_loaded)[:4]}"
    assert sum(k.startswith("lora_te_") for k in lora) == 3 * 20 and sum(k.startswith("lora_unet_") for k in lora)
    check_comfy_text_encoder(patches, text_model, "clip_l")

    export_run(text, tmp_path / "merged", "pipeline")   # the text encoder merged into the pipeline's own
    merged = StableDiffusionPipeline.from_pretrained(tmp_path / "merged").text_encoder
    assert not lowrank.adapter_layers(merged)
    with torch.no_grad():
        ids = token_ids(fresh)
        base, ours = fresh.text_encoder(ids)[0], with_adapter(fresh.text_encoder, text / "text_encoder",
                                                              torch.float32)(ids)[0]
        # float32 both ways, merged W0 + ΔW vs W0 x + ΔW x: roundings of ~1e-7 of activations of order 1, far below
        # the effect (over 1e-2 at --text_encoder_lr 1e-2)
        diff, effect = (merged(ids)[0] - ours).abs().max().item(), (ours - base).abs().max().item()
    assert effect > 1e-2 and diff <= 1e-3 * effect, (diff, effect)

    peft = export_run(text, tmp_path / "peft", "peft")   # one model a folder: the text encoder's beside the UNet's
    assert peft == tmp_path / "peft" / "adapter_model.safetensors" and peft.is_file()
    assert (tmp_path / "peft" / "text_encoder" / "adapter_model.safetensors").is_file()


def check_comfy_text_encoder(patches: dict, text_model, clip: str) -> None:
    """Every adapted layer of `text_model` gets ComfyUI's LoRA patch on its own weight, equal to our ΔW within the
    float32 bound (3R + 4)·u·(|up| @ |down|) (tests/test_export_sdxl_comfy.py)."""
    layers = lowrank.adapter_layers(text_model)
    assert len(layers) == 20
    for name, layer in layers.items():
        key = f"{clip}.transformer.text_model.{name.removeprefix('text_model.')}.weight"
        _, (up, down, _) = patches[key]
        R = down.shape[0]
        with torch.no_grad():
            ours = layer.delta_weight().double()
        theirs = comfy.lora_update(patches[key], tuple(layer.base.weight.shape)).double()
        bound = (3 * R + 4) * U * (up.double().abs() @ down.double().abs())
        assert ((theirs - ours).abs() <= bound).all(), name
        # SDXL conditions on the penultimate hidden states: the first encoder's last layer gets no gradient (in
        # diffusers' script too), its B stays 0 and so does its exported ΔW
        assert ours.abs().max() > 1e3 * bound.max() or (not ours.any() and not theirs.any()), name


def test_resume_with_the_text_encoder_is_exact(tmp_path, monkeypatch, capsys):
    """Per-image captions (encoded per batch), caption dropout (the empty prompt encoded when drawn) and the held-out
    loss (its prompts encoded as the encoder is at each checkpoint) all go through the trained encoder here."""
    src = write_source(tmp_path / "data", "parquet", {"image": photos(4), "text": ["sks cat", "sks cat sits",
                                                                                   "a sks cat", "sks"]})
    check_resume_after_a_kill(train, tmp_path, monkeypatch, *TEXT, "--dataset_name", str(src), "--caption_column",
                              "text", "--instance_prompt", "sks cat", "--caption_dropout", "0.5",
                              "--validation_loss_images", "1")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    same_adapter(straight / "text_encoder", killed / "text_encoder")
    same_adapter(straight / "checkpoint-4" / "text_encoder", killed / "checkpoint-4" / "text_encoder")
    args = ["--method", "delora", "--max_train_steps", "4", "--skip_final_samples", "--resume_from_checkpoint",
            "checkpoint-2"]
    capsys.readouterr()
    for flags, says in (([], "resume it with --train_text_encoder"),
                        (["--train_text_encoder", "--text_encoder_rank", "3"], "was trained with rank=2")):
        assert train(killed, *args, *flags) == 2
        # (the aborted run's progress bar may close here too: only the error lines count)
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and says in err[0], err


def test_sdxl_trains_and_exports_both_encoders(tmp_path):
    out = tmp_path / "sdxl"
    assert train(out, "--pretrained_model_name_or_path", "tiny-sdxl", *RUN[:2], "--max_train_steps", "2",
                 "--skip_final_samples", *TEXT) == 0
    info = json.loads((out / runfolder.RUN_JSON).read_text())["text_encoder"]
    assert info["parts"] == ["text_encoder", "text_encoder_2"]
    assert info["adapted_layers"] == {"text_encoder": 20, "text_encoder_2": 20}
    lora = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert {k.split(".")[0] for k in lora} == {"unet", "text_encoder", "text_encoder_2"}

    pipe = load_pipeline("tiny-sdxl").to(torch.float64)
    ids = token_ids(pipe)
    ours = {k: with_adapter(getattr(pipe, k), out / k) for k in info["parts"]}
    plain = {k: getattr(pipe, k).state_dict() for k in ours}   # before diffusers wraps the layers
    with torch.no_grad():
        want = {k: (getattr(pipe, k)(ids)[0], ours[k](ids)[0]) for k in ours}
        pipe.load_lora_weights(str(out))
        for k, (base, mine) in want.items():
            check_exact(getattr(pipe, k)(ids)[0], mine, base, f"{k}/diffusers")

    lora = load_file(str(export_run(out, tmp_path / "comfy", "kohya")))
    assert {k.split("_text_model")[0] for k in lora if k.startswith("lora_te")} == {"lora_te1", "lora_te2"}
    clip = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
    keys = set().union(*(comfy.clip_state_keys(plain[k], clip[k]) for k in ours))
    patches, not_loaded = comfy.load_lora({k: v for k, v in lora.items() if k.startswith("lora_te")},
                                          comfy.model_lora_keys_clip(keys))
    assert not not_loaded, f"ComfyUI: lora key not loaded: {sorted(not_loaded)[:4]}"
    for k, model in ours.items():
        check_comfy_text_encoder(patches, model, clip[k])


@pytest.mark.slow
def test_sdxl_text_encoders_under_two_ddp_processes(tmp_path, env):  # noqa: F811 (the fixture)
    """DDP over gloo: SDXL's first text encoder's last layer gets no gradient (penultimate hidden states), which DDP
    must be told of (find_unused_parameters, as diffusers' SDXL script); the run ends with identical replicas (the
    loop's check) and one set of outputs."""
    out = tmp_path / "ddp"
    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), SCRIPT, "--output_dir", str(out),
           "--pretrained_model_name_or_path", "tiny-sdxl", "--seed", "0", "--resolution", "32", "--rank", "4",
           "--max_train_steps", "3", "--checkpointing_steps", "2", "--num_inference_steps", "1",
           "--num_validation_images", "1", "--report_to", "none", "--skip_final_samples", *TEXT]
    proc = run(cmd, dict(env, ACCELERATE_USE_CPU="true"))
    assert proc.stdout.count("done:") == 1
    assert json.loads((out / runfolder.RUN_JSON).read_text())["num_processes"] == 2
    for part in ("text_encoder", "text_encoder_2"):
        assert lowrank.read_adapter(out / "checkpoint-2" / part)[0].rank == 2


@pytest.mark.parametrize("flags, says", [
    (["--pretrained_model_name_or_path", "tiny-flux", "--train_text_encoder"],
     "--train_text_encoder is not supported for the flux family"),
    (["--pretrained_model_name_or_path", "tiny-flux2-klein", "--train_text_encoder"],
     "--train_text_encoder is not supported for the flux2-klein family"),
    (["--train_text_encoder", "--text_encoder_rank", "0"], "--text_encoder_rank must be a positive integer"),
    (["--train_text_encoder", "--text_encoder_lr", "-1"], "--text_encoder_lr must be positive"),
    (["--train_text_encoder", "--offload"], "give one of the two"),
])
def test_refusals_are_one_error_line_and_nothing_written(tmp_path, capsys, flags, says):
    out = tmp_path / "run"
    assert train(out, *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and says in err[0], err
    assert not out.exists()
