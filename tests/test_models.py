"""The tiny SD preset and load_pipeline: built once into a cache, loaded back through from_pretrained,
a tokenizer that gives real ids, one-line errors for names that cannot be loaded."""
import json
import os
import threading

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from diffusers import DDPMScheduler, StableDiffusionPipeline  # noqa: E402

from training.common import models  # noqa: E402
from training.common.models import TINY, ModelLoadError, tiny_path
from training.families import load_pipeline  # noqa: E402


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_tiny_preset_is_built_once_and_loaded_through_from_pretrained(cache, monkeypatch):
    path = tiny_path()
    assert path.parent == cache and (path / "model_index.json").is_file()
    index = json.loads((path / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["tokenizer"][1] == "CLIPTokenizer"
    stamp = (path / "unet" / "config.json").stat().st_mtime_ns
    assert tiny_path() == path and (path / "unet" / "config.json").stat().st_mtime_ns == stamp   # not rebuilt
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]

    calls = []
    real = StableDiffusionPipeline.from_pretrained.__func__

    def spy(cls, name, *a, **kw):
        calls.append(str(name))
        return real(cls, name, *a, **kw)

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", classmethod(spy))
    pipe = load_pipeline(TINY)
    again = load_pipeline(None)          # None / "" also mean the tiny preset
    assert calls == [str(path), str(path)]
    assert isinstance(pipe, StableDiffusionPipeline) and isinstance(pipe.scheduler, DDPMScheduler)
    assert tuple(pipe.unet.config.block_out_channels) == (32, 64)
    assert pipe.vae_scale_factor == 2
    cfg = pipe.text_encoder.config
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (5, 32)
    for a, b in zip(pipe.unet.state_dict().values(), again.unet.state_dict().values()):
        assert torch.equal(a, b)        # fixed seed: the same weights every time


def test_rebuild_gives_identical_weights(cache, tmp_path):
    models.build_tiny(tmp_path / "a")
    models.build_tiny(tmp_path / "b")
    a = StableDiffusionPipeline.from_pretrained(tmp_path / "a")
    b = StableDiffusionPipeline.from_pretrained(tmp_path / "b")
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_concurrent_builders_share_one_complete_model(cache):
    results, errors = [], []

    def build():
        try:
            results.append(tiny_path())
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    assert sorted(p.name for p in cache.iterdir()) == [results[0].name]   # no temp dirs left behind
    assert isinstance(load_pipeline(TINY), StableDiffusionPipeline)


def test_tokenizer_gives_real_ids(cache):
    tok = load_pipeline(TINY).tokenizer
    assert len(tok) > 500
    for prompt in ["a photo of sks cat", "a sks cat on the beach with a mountain in the background",
                   "A cube shaped sks cat, floating in an ocean of milk!", "Zebra 42 café"]:
        ids = tok(prompt).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        inner = ids[1:-1]
        assert len(inner) >= len(prompt.split())
        assert tok.unk_token_id not in inner and tok.eos_token_id not in inner
        assert tok.decode(inner).replace(" ", "") == prompt.lower().replace(" ", "")
    assert tok.convert_ids_to_tokens(tok("sks").input_ids[1:-1]) == ["sks</w>"]   # whole-word merges
    batch = tok(["a photo of sks cat"], padding="max_length", max_length=tok.model_max_length, return_tensors="pt")
    assert batch.input_ids.shape == (1, 77)


def test_local_path_loads_through_diffusers(cache, tmp_path):
    pipe = load_pipeline(TINY)
    pipe.save_pretrained(tmp_path / "copy")
    loaded = load_pipeline(str(tmp_path / "copy"))
    assert torch.equal(loaded.unet.conv_in.weight, pipe.unet.conv_in.weight)


def test_unreachable_name_gives_one_line_error(cache, tmp_path):
    with pytest.raises(ModelLoadError) as err:
        load_pipeline("no-such-org/no-such-model")
    msg = str(err.value)
    assert "\n" not in msg and "no-such-org/no-such-model" in msg
    assert "local folder" in msg and "'tiny'" in msg and "offline" in msg
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(ModelLoadError) as err:
        load_pipeline(str(tmp_path / "not-a-model"))
    assert "\n" not in str(err.value) and "model_index.json" in str(err.value)
