"""The Generate tab's export: a run's checkpoint or final adapter as a file other tools load, through the
same training.common.export code as the CLI; the diffusers file is checked with diffusers' own loader."""
from __future__ import annotations

import json
import zipfile

import pytest
import torch

import lowrank
from app import generate as G
from app.inputs import InputError
from training.common.models import TINY
from training.families import load_pipeline


def make_run(root, method: str):
    """A run folder as the trainer leaves it: run.json, a checkpoint and the final adapter (random factors)."""
    run = root / f"run-{method}"
    pipe = load_pipeline(TINY)
    torch.manual_seed(0)
    lowrank.inject(pipe.unet, lowrank.AdapterConfig(method=method, rank=2, target_modules=["to_q", "to_v"]))
    with torch.no_grad():
        for p in pipe.unet.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    lowrank.save_adapter(pipe.unet, run / "checkpoint-1")
    (run / "checkpoint-1" / "trainer_state.json").write_text(json.dumps({"global_step": 1}))
    lowrank.save_adapter(pipe.unet, run)
    (run / "run.json").write_text(json.dumps({"args": {"pretrained_model_name_or_path": None}}))
    return run, pipe.unet


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("export"), "lora")


def unet_output(unet):
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, 16, 16, generator=gen)
    text = torch.randn(1, 5, unet.config.cross_attention_dim, generator=gen)
    with torch.no_grad():
        return unet(sample, torch.tensor([10]), text).sample


def test_diffusers_export_of_the_final_adapter_loads_in_diffusers(lora_run):
    run, ours = lora_run
    path = G.export(run, G.FINAL, "diffusers (pipe.load_lora_weights)")
    assert path == run / "exports" / "final-diffusers" / "pytorch_lora_weights.safetensors" and path.is_file()
    pipe = load_pipeline(TINY)
    base = unet_output(pipe.unet)
    pipe.load_lora_weights(str(path.parent))
    theirs, expected = unet_output(pipe.unet), unet_output(ours)
    effect = (expected - base).abs().max()
    assert effect > 1e-3                                   # the adapter does something
    # fp32 factors, one forward pass: the difference is float32 rounding, far below the effect
    assert (theirs - expected).abs().max() <= 1e-4 * effect


def test_kohya_and_peft_exports_of_a_checkpoint(lora_run):
    run, _ = lora_run
    kohya = G.export(run, "step 1", "kohya (ComfyUI / AUTOMATIC1111)")
    assert kohya.suffix == ".safetensors" and kohya.parent == run / "exports" / "checkpoint-1-kohya"
    archive = G.export(run, "step 1", "peft (PeftModel.from_pretrained)")
    assert archive.suffix == ".zip"
    with zipfile.ZipFile(archive) as z:
        # the peft files and the export's model card (the run has no sample grid to travel with it)
        assert sorted(z.namelist()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_a_format_that_cannot_hold_the_method_and_the_base_model_are_refused(tmp_path):
    run, _ = make_run(tmp_path, "dora")
    with pytest.raises(InputError, match="diffusers"):      # DoRA as kohya: the error names the formats that can
        G.export(run, G.FINAL, "kohya (ComfyUI / AUTOMATIC1111)")
    with pytest.raises(InputError, match="no adapter"):
        G.export(run, G.BASE, "diffusers (pipe.load_lora_weights)")
    with pytest.raises(InputError, match="Unknown export format"):
        G.export(run, G.FINAL, "onnx")
    assert not (run / "exports" / "final-kohya").exists() or not any((run / "exports" / "final-kohya").iterdir())


def test_dora_exports_for_comfyui_as_a_diff_file(tmp_path):
    """The kohya refusal names the format that holds DoRA, and that choice in the same dropdown writes it."""
    from safetensors.torch import load_file

    run, unet = make_run(tmp_path, "dora")
    with pytest.raises(InputError, match="'diff'"):
        G.export(run, G.FINAL, "kohya (ComfyUI / AUTOMATIC1111)")
    label = next(k for k, v in G.EXPORT_FORMATS.items() if v == "diff")
    path = G.export(run, G.FINAL, label)
    assert path == run / "exports" / "final-diff" / "final-diff.safetensors"
    lora = load_file(str(path))
    layers = lowrank.adapter_layers(unet)
    assert sorted(lora) == sorted(f"lora_unet_{n.replace('.', '_')}.diff" for n in layers)
    for name, layer in layers.items():   # W_eff − W0 of each layer, the tensor the UIs add to W
        want = layer.delta_weight().reshape(layer.base.weight.shape)
        torch.testing.assert_close(lora[f"lora_unet_{name.replace('.', '_')}.diff"], want, rtol=1e-5, atol=1e-6)
