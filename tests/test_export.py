"""Export with the real loaders as oracles: for every method, the tiny SD UNet with a non-trivial adapter is
exported as diffusers / kohya / peft files and as a merged pipeline, loaded by diffusers (load_lora_weights,
from_pretrained) and by peft (PeftModel.from_pretrained), and must give our UNet's output.

Exactness is checked in float64 (UNet and inputs), where the only error left is the float32 storage of the
factors (~1e-7 of the adapter's effect), against the bound max|out − ours| ≤ 1e-5·max|ours − base|;
one float32 check and the merged pipeline show the same holds at the precision people run in.
"""
import copy
import json

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open

import lowrank
from lowrank import AdapterConfig
from training.common.export import export_model
from training.exporting import export_run
from training.families import load_pipeline

TARGETS = ["to_q", "to_out.0", "proj_in"]   # Linear layers and a 1x1 conv (proj_in)
OPTIONS = {   # alpha != r wherever alpha applies: the scale must be folded, not assumed
    "lora": dict(rank=4, alpha=6.0),
    "dora": dict(rank=4, alpha=6.0),
    "delora": dict(rank=4),                                   # default: subtract init, rank 2r in the file
    "ether": dict(ether_blocks=2),                            # rank n = 2
    "etherplus": dict(),                                      # two-sided: rank 4
    "deltalora": dict(rank=4, alpha=6.0, deltalora_start_step=0),   # snapshot at init: rank 2r
    "dyndora": dict(rank=2, alpha=6.0, dyndora_total_steps=10),
    "mult_relaxed": dict(rank=4),                             # (Ĥ − I)W: r/2 terms per side, rank r
    "mult_highrank": dict(rank=4),
    "mult_bounded": dict(),                                   # one pair: rank 2
}
FILE_RANK = {"lora": 4, "dora": 4, "delora": 8, "ether": 2, "etherplus": 4, "deltalora": 8, "dyndora": 2,
             "mult_relaxed": 4, "mult_highrank": 4, "mult_bounded": 2}


@pytest.fixture(scope="module")
def pipe():
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()   # "no LoRA keys for the text encoder": true and expected here
    p = load_pipeline("tiny")
    p.set_progress_bar_config(disable=True)
    p.unet32 = copy.deepcopy(p.unet)   # float32 base, kept before the pipeline's own UNet goes float64
    p.unet.double()                    # the UNet the diffusers loader adapts in the float64 checks
    return p


@pytest.fixture(scope="module")
def unet32(pipe):
    return pipe.unet32


@pytest.fixture(scope="module")
def unet64(pipe):
    return copy.deepcopy(pipe.unet)


@pytest.fixture(scope="module")
def base64(unet64):
    return run(unet64)


def inputs(dtype):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, 4, 8, 8, generator=g).to(dtype), torch.tensor([10]),
            torch.randn(1, 5, 32, generator=g).to(dtype))


@torch.no_grad()
def run(unet):
    x, t, enc = inputs(next(unet.parameters()).dtype)
    return unet(x, t, enc).sample


def adapted(base, method: str):
    """A copy of `base` with a seeded, clearly non-trivial adapter of `method` (every parameter perturbed)."""
    unet = copy.deepcopy(base)
    lowrank.inject(unet, AdapterConfig(method=method, target_modules=TARGETS, **OPTIONS[method]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn(p.shape, generator=g).to(p.dtype) * p.abs().mean().clamp_min(0.2))
        if method == "deltalora":   # a snapshot B_K A_K ≠ 0 (B starts at 0): its rank-r term is in the file
            for layer in lowrank.adapter_layers(unet).values():
                layer.deltalora_B_start.normal_(generator=g).mul_(0.1)
        if method == "dyndora":   # a pruned component (c = 0) is dropped from the file, not written as zeros
            for layer in lowrank.adapter_layers(unet).values():
                layer.dyndora_c[0] = 0.0
    return unet


def check(got, ours, base, what):
    effect = (ours - base).abs().max().item()
    diff = (got - ours).abs().max().item()
    assert effect > 1e-2, f"{what}: the adapter does (almost) nothing ({effect:.2e}); the test would prove nothing"
    assert diff <= 1e-5 * effect, f"{what}: max diff {diff:.2e} vs adapter effect {effect:.2e}"
    return diff / effect


def load_diffusers(pipe, directory):
    pipe.load_lora_weights(str(directory))
    try:
        return run(pipe.unet)
    finally:
        pipe.unload_lora_weights()


@pytest.mark.parametrize("method", list(lowrank.METHODS))
def test_every_method_every_format_loads_exactly(method, pipe, unet64, base64, tmp_path):
    assert set(OPTIONS) == set(lowrank.METHODS)
    ours_model = adapted(unet64, method)
    base, ours = base64, run(ours_model)
    for fmt in ("diffusers", "kohya", "peft"):
        out = tmp_path / fmt
        if method == "dora" and fmt == "kohya":
            with pytest.raises(lowrank.ExportError, match="diffusers.*peft"):
                lowrank.export(ours_model, out, fmt)
            assert not out.exists()
            continue
        written = lowrank.export(ours_model, out, fmt)
        with safe_open(str(written), "pt") as f:
            keys, meta = list(f.keys()), f.metadata()
            down = f.get_tensor(next(k for k in keys if k.endswith(("lora_A.weight", "lora_down.weight"))))
            conv_down = f.get_tensor(next(k for k in keys if k.endswith(("proj_in.lora_A.weight",
                                                                          "proj_in.lora_down.weight"))))
        if fmt == "diffusers":
            assert all(k.startswith("unet.") for k in keys)
            cfg = json.loads(meta["lora_adapter_metadata"])
            assert cfg["unet.lora_alpha"] == cfg["unet.r"] == FILE_RANK[method]   # scale folded: 1
        if fmt == "kohya":
            assert all(k.startswith("lora_unet_") for k in keys)
        assert conv_down.dim() == 4   # 1x1 conv: (R, in, 1, 1), as kohya and peft hold conv LoRA
        if fmt != "peft" or method not in ("lora", "dora"):   # peft lora/dora stay native: r as trained
            assert down.shape[0] == FILE_RANK[method]
        got = (load_diffusers(pipe, out) if fmt != "peft"
               else run(PeftModel.from_pretrained(copy.deepcopy(unet64), out)))
        check(got, ours, base, f"{method}/{fmt}")
    assert not any("lora" in n for n, _ in pipe.unet.named_modules())   # unloaded: the shared base is plain again


def test_float32_default_delora(pipe, unet32, tmp_path):
    """The default method at float32, as people run it: the export is exact to fp32 rounding. Written beside our
    own adapter files, as a trainer does in its run folder: load_lora_weights(run folder) picks the diffusers file."""
    model = adapted(unet32, "delora")
    lowrank.save_adapter(model, tmp_path)
    lowrank.export(model, tmp_path, "diffusers")
    fresh = type(pipe)(**{**pipe.components, "unet": copy.deepcopy(unet32)})
    fresh.load_lora_weights(str(tmp_path))
    check(run(fresh.unet), run(model), run(unet32), "delora/diffusers fp32")


@pytest.mark.parametrize("method", ["dora", "etherplus"])
def test_merged_pipeline_loads_with_from_pretrained(method, pipe, unet32, tmp_path):
    """DoRA (not low rank) and two-sided ETHER+ folded into the UNet of a complete pipeline folder."""
    from diffusers import StableDiffusionPipeline

    model = adapted(unet32, method)
    ours, base = run(model), run(unet32)
    export_model(model, tmp_path / "merged", "pipeline", pipeline=pipe)
    assert lowrank.adapter_layers(model)   # the caller's model keeps its adapters (merged in a copy)
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "merged")
    assert not lowrank.adapter_layers(loaded.unet)
    check(run(loaded.unet), ours, base, f"{method}/pipeline")


def test_text_encoder_component(pipe, tmp_path):
    text_encoder = copy.deepcopy(pipe.text_encoder)
    # all four attention projections: diffusers only recognises a kohya text-encoder file that has out_proj
    lowrank.inject(text_encoder, AdapterConfig(method="ether", target_modules=["q_proj", "k_proj", "v_proj",
                                                                                "out_proj"]))
    ids = torch.tensor([[49406, 1, 2, 3, 49407]]).clamp_max(pipe.tokenizer.vocab_size - 1)
    with torch.no_grad():
        base, ours = pipe.text_encoder(ids)[0], text_encoder(ids)[0]
    for fmt in ("diffusers", "kohya"):
        lowrank.export(text_encoder, tmp_path / fmt, fmt, component="text_encoder")
        pipe.load_lora_weights(str(tmp_path / fmt))
        with torch.no_grad():
            got = pipe.text_encoder(ids)[0]
        pipe.unload_lora_weights()
        check(got, ours, base, f"text_encoder/{fmt}")


def test_export_run_and_cli(pipe, unet32, tmp_path, capsys):
    """From a saved run folder: the base comes from run.json; bad input is one `error:` line and exit 2."""
    from training import export as cli

    run_dir = tmp_path / "run"
    model = adapted(unet32, "ether")
    lowrank.save_adapter(model, run_dir)
    (run_dir / "run.json").write_text(json.dumps({"args": {"pretrained_model_name_or_path": "tiny"}}))
    written = export_run(run_dir, tmp_path / "cat", "kohya")
    assert written == tmp_path / "cat" / "cat.safetensors" and written.is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # no temp folder left behind
    pipe.load_lora_weights(str(tmp_path / "cat"))
    got = run(pipe.unet)
    pipe.unload_lora_weights()
    check(got.float(), run(model), run(unet32), "export_run/kohya")   # the pipe's UNet is float64

    (tmp_path / "file").write_text("x")
    for argv in ([str(tmp_path), "--output", str(tmp_path / "o")],                     # not an adapter folder
                 [str(run_dir), "--output", str(tmp_path / "o"), "--format", "onnx"],    # unknown format
                 [str(run_dir), "--output", str(tmp_path / "file")]):                    # output is a file
        capsys.readouterr()
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
    assert not (tmp_path / "o").exists()


def test_a_glue_run_exports_for_peft_with_its_head(tmp_path, capsys):
    """`python -m training.export <glue run> --format peft` loads with PeftModel.from_pretrained on a fresh
    AutoModelForSequenceClassification and gives the trained model's logits (head included)."""
    from training import glue
    from training.export import main as export_cli
    from training.text.language import load_language_model, resolve_model

    run = tmp_path / "run"
    assert glue.main(["--method", "delora", "--model_name_or_path", "tiny-bert", "--max_train_steps", "2",
                      "--output_dir", str(run), "--num_threads", "1"]) == 0
    out = tmp_path / "peft"
    assert export_cli([str(run), "--format", "peft", "--output", str(out)]) == 0
    ours, tok = load_language_model("tiny-bert", "classification", num_labels=2)
    lowrank.load_adapter(ours, run)
    fresh, _ = load_language_model("tiny-bert", "classification", num_labels=2)
    theirs = PeftModel.from_pretrained(fresh, out)
    batch = tok(["a good film", "not a good film at all"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(**batch).logits, ours.eval()(**batch).logits, rtol=1e-5, atol=1e-6)
    # the config names its base: the preset's folder
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        resolve_model("tiny-bert", "tiny-bert")
    assert export_cli([str(run), "--format", "kohya", "--output", str(tmp_path / "k")]) == 2
    assert "exports as --format peft" in capsys.readouterr().err


def test_exported_files_are_readable_by_other_users(pipe, unet32, tmp_path):
    """A UI running as another user (ComfyUI, A1111) must read the export: files and folders get the modes of
    ordinary ones under this process's umask (safetensors alone would write 0600, mkdtemp 0700)."""
    from ground.runfolder import UMASK

    run_dir = tmp_path / "run"
    lowrank.save_adapter(adapted(unet32, "lora"), run_dir)
    (run_dir / "run.json").write_text(json.dumps({"args": {"pretrained_model_name_or_path": "tiny"}}))
    for fmt in ("kohya", "pipeline"):
        out = tmp_path / fmt
        export_run(run_dir, out, fmt)
        for p in [out, *out.rglob("*")]:
            want = (0o777 if p.is_dir() else 0o666) & ~UMASK
            assert p.stat().st_mode & 0o777 == want, (p, oct(p.stat().st_mode))
    assert (run_dir / "adapter.safetensors").stat().st_mode & 0o777 == 0o666 & ~UMASK
