"""Every trainer feature a LoRA user expects, in one DreamBooth run (tiny SD, 32 px): cached latents, aspect-ratio
buckets, text-encoder adapters, EMA, min-SNR, noise offset and caption dropout. Together they still give a run
resumed from its checkpoint the straight run's bits (the adapters and their averages, text encoder included), the
uncached run's bits, and the same bits again from the run's own config.yaml."""
import shutil

import pytest
import torch
from safetensors.torch import load_file

from ground import runfolder
from training import dreambooth

ALL = ["--seed", "0", "--resolution", "32", "--rank", "2", "--max_train_steps", "6", "--checkpointing_steps", "3",
       "--num_inference_steps", "1", "--num_validation_images", "1", "--report_to", "none", "--export_diffusers",
       "false", "--method", "delora", "--center_crop", "--enable_bucket", "--bucket_reso_steps", "16",
       "--train_text_encoder", "--ema_decay", "0.9", "--snr_gamma", "5", "--noise_offset", "0.05",
       "--caption_dropout", "0.3", "--train_batch_size", "2", "--skip_final_samples"]
FILES = [runfolder.ADAPTER_WEIGHTS, f"text_encoder/{runfolder.ADAPTER_WEIGHTS}",
         f"{runfolder.EMA_DIR}/{runfolder.ADAPTER_WEIGHTS}",
         f"{runfolder.EMA_DIR}/text_encoder/{runfolder.ADAPTER_WEIGHTS}"]

pytestmark = pytest.mark.usefixtures("tiny_cache")


def same_bits(a, b):
    for name in FILES:
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys() and x, name
        assert all(torch.equal(x[k], y[k]) for k in x), name


def test_all_features_in_one_run_resume_cache_and_config_exactly(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert dreambooth.main(["--output_dir", str(straight), *ALL, "--cache_latents"]) == 0
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    assert dreambooth.main(["--output_dir", str(resumed), *ALL, "--cache_latents",
                            "--resume_from_checkpoint", "latest"]) == 0
    same_bits(straight, resumed)
    uncached = tmp_path / "uncached"
    assert dreambooth.main(["--output_dir", str(uncached), *ALL]) == 0
    same_bits(straight, uncached)
    again = tmp_path / "again"
    assert dreambooth.main(["--config", str(straight / "config.yaml"), "--output_dir", str(again)]) == 0
    same_bits(straight, again)
    card = (straight / "README.md").read_text()
    for setting in ("snr_gamma=5.0", "noise_offset=0.05", "caption_dropout=0.3", "cache_latents=True"):
        assert f"`{setting}`" in card, setting
    assert runfolder.EMA_DIR in card and "text_encoder" in card
