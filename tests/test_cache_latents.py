"""--cache_latents (training/images/latent_cache.py): a cached DreamBooth run ends with the uncached run's adapter bit
for bit (tiny SD with prior preservation, held-out images and two batch sizes; tiny FLUX.2-klein with prior
preservation), its losses and validation losses equal too; the VAE runs only on batches that hold an image not yet
cached (counted, against the batches the seed's epochs make); random crops with many windows are refused in one
line, nothing written.

Trainer runs are in-process at 32 px; class images are written here (seeded noise), not generated."""
import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderKLFlux2
from PIL import Image

from tests.family_runs import one_thread  # noqa: F401
from tests.stderr import one_error_line
from tests.test_dreambooth import metrics
from tests.test_semantic_map import FAST as SEMANTIC
from tests.test_semantic_map import read_final, write_ade
from tests.test_training_faults import same_adapter
from training import dreambooth, semantic_map
from training.common.batches import epoch_batches
from training.images.latent_cache import CachedVAE, crop_windows
from training.subject.args import build_parser

FAST = ["--seed", "0", "--resolution", "32", "--rank", "2", "--report_to", "none", "--skip_final_samples",
        "--export_diffusers", "false", "--method", "delora"]

pytestmark = pytest.mark.usefixtures("tiny_cache")


def class_dir(folder, n: int):
    """n square RGB noise images of 32 px (seeded): class images that need no sampling."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"class-{i}.png")
    return str(folder)


@pytest.fixture
def encodes(monkeypatch):
    """The batch size of every call the VAEs' encode gets, in order."""
    sizes = []
    for cls in (AutoencoderKL, AutoencoderKLFlux2):
        def counted(self, x, *a, _encode=cls.encode, **k):
            sizes.append(len(x))
            return _encode(self, x, *a, **k)
        monkeypatch.setattr(cls, "encode", counted)
    return sizes


def expected_misses(n_items: int, n_instance: int, n_class: int, batch: int, steps: int, seed: int) -> int:
    """The training batches that hold an image not cached yet: each batch's images are the items' instance and class
    images (item i: instance i % n_instance, class i % n_class), each keyed with the batch's size, as CachedVAE."""
    cached, misses, left = set(), 0, steps
    for epoch in range(steps):
        for ks in epoch_batches(n_items, batch, epoch, seed):
            if not left:
                return misses
            left -= 1
            rows = 2 * len(ks)
            keys = {(rows, "instance", k % n_items % n_instance) for k in ks}
            keys |= {(rows, "class", k % n_items % n_class) for k in ks}
            misses += not keys <= cached
            cached |= keys
    return misses


def test_cached_sd_run_is_bit_identical_and_encodes_each_image_once_per_batch_size(tmp_path, encodes):
    """5 example images, 1 held out: 4 items of (instance, class) in batches of 3 and 1 (6 and 2 rows), 6 steps =
    3 epochs, validation loss at steps 2, 4, 6. Without the cache the VAE runs at every step and every validation
    loss; with it, only on the batches holding a new image and once for the held-out image."""
    args = [*FAST, "--with_prior_preservation", "--class_data_dir", class_dir(tmp_path / "classes", 3),
            "--num_class_images", "3", "--train_batch_size", "3", "--max_train_steps", "6", "--checkpointing_steps",
            "2", "--validation_loss_images", "1"]
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    assert dreambooth.main(["--output_dir", str(plain), *args]) == 0
    assert len(encodes) == 6 + 4   # 6 steps, the base model's validation loss and 3 checkpoints'
    encodes.clear()
    assert dreambooth.main(["--output_dir", str(cached), *args, "--cache_latents"]) == 0

    same_adapter(plain, cached)
    same_adapter(plain / "checkpoint-4", cached / "checkpoint-4")
    a, b = metrics(plain), metrics(cached)
    assert [(r["loss"], r.get("val_loss")) for r in a] == [(r["loss"], r.get("val_loss")) for r in b]
    assert [r["val_loss"] for r in b if "val_loss" in r] and len({r["loss"] for r in b}) == 6
    misses = expected_misses(4, 4, 3, 3, 6, seed=0)
    assert 2 <= misses < 6   # some batches are all cached (else the test would show nothing)
    assert len(encodes) == misses + 1 and encodes.count(1) == 1   # + the held-out image, once
    assert sorted(set(encodes)) == [1, 2, 6]
    run = json.loads((cached / "run.json").read_text())
    assert run["args"]["cache_latents"] is True
    assert json.loads((plain / "run.json").read_text())["args"]["cache_latents"] is False


def test_cached_flux2_klein_run_is_bit_identical(tmp_path, encodes):
    """The DiT family whose latents are the VAE's mode, patchified and batch-normalised: 4 steps of batch 1 with
    prior preservation (5 items of 2 rows); the VAE runs on the first epoch's 5 batches only."""
    args = ["--pretrained_model_name_or_path", "tiny-flux2-klein", *FAST, "--with_prior_preservation",
            "--class_data_dir", class_dir(tmp_path / "classes", 2), "--num_class_images", "2", "--max_train_steps",
            "7", "--checkpointing_steps", "10"]
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    assert dreambooth.main(["--output_dir", str(plain), *args]) == 0
    encodes.clear()
    assert dreambooth.main(["--output_dir", str(cached), *args, "--cache_latents"]) == 0
    same_adapter(plain, cached)
    assert [r["loss"] for r in metrics(plain)] == [r["loss"] for r in metrics(cached)]
    assert encodes == [2] * 5   # each item's (instance, class) pair once; steps 6 and 7 are cached


def test_cached_semantic_map_run_is_bit_identical(tmp_path, encodes):
    """The semantic-map trainer centre-crops every pair, so its cache is always exact: 2 pairs in batches of 1 for 5
    steps, the adapter and the conditioning encoder equal to the uncached run's, the VAE run on the first epoch's 2
    batches only (the rest, and no checkpoint sampling here, from the cache)."""
    data = write_ade(tmp_path / "ade", n_train=2, size=(40, 36))
    args = [*SEMANTIC, "--train_data_dir", str(data), "--max_train_steps", "5", "--checkpointing_steps", "10",
            "--skip_final_samples"]
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    assert semantic_map.main(["--output_dir", str(plain), *args]) == 0
    assert encodes == [1] * 5
    encodes.clear()
    assert semantic_map.main(["--output_dir", str(cached), *args, "--cache_latents"]) == 0
    assert encodes == [1] * 2
    (a_ad, a_enc), (b_ad, b_enc) = read_final(plain), read_final(cached)
    assert a_ad.keys() == b_ad.keys() and all(torch.equal(a_ad[k], b_ad[k]) for k in a_ad)
    assert a_enc.keys() == b_enc.keys() and all(torch.equal(a_enc[k], b_enc[k]) for k in a_enc)
    assert [r["loss"] for r in metrics(plain)] == [r["loss"] for r in metrics(cached)]
    assert "`cache_latents=True`" in (cached / "README.md").read_text()   # the model card says so


def test_a_cache_hit_rebuilds_the_vae_output():
    """Rows of a batch encoded once, served in another order and composition of the same size: the distribution's
    parameters equal a fresh encode's, bit for bit (what the runs above rely on)."""
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[32, 64], latent_channels=4, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2).eval()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    cache = CachedVAE(vae)
    with torch.no_grad():
        cache.encode(x[[0, 1]])
        cache.encode(x[[2, 3]])
        served = cache.encode(x[[3, 0]]).latent_dist.parameters
        fresh = vae.encode(x[[3, 0]]).latent_dist.parameters
    assert torch.equal(served, fresh) and served.stride() == fresh.stride()
    assert cache.encodes == 2 and cache.encoded_images == 4 and len(cache.rows) == 4


def test_random_crops_with_many_windows_are_refused(tmp_path, capsys):
    folder = tmp_path / "subject"
    folder.mkdir()
    Image.new("RGB", (48, 32), (120, 80, 40)).save(folder / "wide.png")   # 17 windows at 32 px
    Image.new("RGB", (32, 32), (20, 80, 40)).save(folder / "square.png")
    assert crop_windows(Image.new("RGB", (48, 32)), 32) == 17 and crop_windows(Image.new("RGB", (33, 33)), 32) == 4
    out = tmp_path / "out"
    flags = ["--output_dir", str(out), *FAST, "--instance_data_dir", str(folder), "--instance_prompt", "a sks cat",
             "--max_train_steps", "1", "--cache_latents"]
    assert dreambooth.main(flags) == 2
    line = one_error_line(capsys)
    assert "--cache_latents" in line and "48x32" in line and "--center_crop" in line
    assert not out.exists()
    assert dreambooth.main([*flags, "--center_crop"]) == 0   # one window per image: cached


def test_help_lists_the_flag():
    assert "--cache_latents" in build_parser().format_help()
