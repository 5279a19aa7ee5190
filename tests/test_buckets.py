"""Aspect-ratio buckets (--enable_bucket; training/images/buckets.py, training.common.batches.group_batches): the
bucket list and each image's bucket; batches of a portrait/landscape/square mix that keep to one bucket, their
tensors' shapes (class images in the instance image's bucket) and SDXL's micro-conditioning of them; batch order a
function of (seed, epoch), every image once per epoch, processes dealt equal shares; DreamBooth runs on tiny SD at
32 px: bit-identical reruns, exact resume after a kill, --cache_latents (with --center_crop) bit-identical; the
flags in run.json and the model card; bad values in one line, nothing written."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.family_runs import check_resume_after_a_kill, one_thread  # noqa: F401
from tests.stderr import one_error_line
from tests.test_training_faults import same_adapter
from training import dreambooth
from training.common.batches import epoch_batches, steps_per_epoch
from training.families.sdxl import SDXL
from training.images.buckets import bucket_sizes, cover, nearest_bucket
from training.subject.data import DreamBoothDataset, collate

BUCKETS = ["--enable_bucket", "--bucket_reso_steps", "8"]   # at --resolution 32: sides 16..64, area <= 32²
FAST = ["--seed", "0", "--resolution", "32", "--rank", "2", "--report_to", "none", "--skip_final_samples"]
SIZES = [(32, 64), (64, 32), (32, 32), (32, 60)]   # portrait, landscape, square, a portrait a little less tall

pytestmark = pytest.mark.usefixtures("tiny_cache")


def noise_images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def subject_dir(folder):
    folder.mkdir()
    for i, img in enumerate(noise_images(SIZES)):
        img.save(folder / f"{i}.png")
    return ["--instance_data_dir", str(folder), "--instance_prompt", "a photo of sks cat"]


def test_bucket_list_and_assignment():
    sizes = bucket_sizes(32, 8, 16, 64)
    assert (32, 32) in sizes and all(w * h <= 32 * 32 and w % 8 == 0 == h % 8 and 16 <= min(w, h) for w, h in sizes)
    assert all((h, w) in sizes for w, h in sizes)   # every bucket has its transpose
    assert sizes == sorted({(16, 64), (64, 16), (24, 40), (40, 24), (32, 32), (16, 48), (48, 16), (16, 56),
                            (56, 16)})
    assert [nearest_bucket(s, sizes) for s in SIZES] == [(24, 40), (40, 24), (32, 32), (24, 40)]
    assert nearest_bucket((1000, 1000), sizes) == (32, 32)
    assert cover(noise_images([(32, 64)])[0], (24, 40)).size == (24, 48)   # covers: 0.75 x, 8 rows to crop
    sd = bucket_sizes(512, 64, 256, 1024)   # kohya's defaults at 512 px
    assert {(256, 1024), (320, 768), (384, 640), (448, 576), (512, 512), (576, 448)} <= set(sd)
    assert nearest_bucket((683, 512), sd) == (576, 448) and nearest_bucket((512, 683), sd) == (448, 576)   # 4:3


def test_batches_keep_to_one_bucket_and_have_its_shape():
    """4 instance images (2 portrait, 1 landscape, 1 square) and 3 class images, batch 2: per epoch the portrait
    pair, the landscape and the square image; each batch one tensor, class half in the same bucket; SDXL's time ids
    of a batch: size when cropped, crop corner, the bucket as target size."""
    instance, classes = noise_images(SIZES), noise_images([(32, 32)] * 3, seed=1)
    buckets = [nearest_bucket(img.size, bucket_sizes(32, 8, 16, 64)) for img in instance]
    data = DreamBoothDataset(instance, classes, 32, center_crop=False, seed=0, buckets=buckets)
    assert data.groups == buckets and steps_per_epoch(4, 2, 1, groups=data.groups) == 3
    shapes = []
    for epoch in range(3):
        batches = epoch_batches(len(data), 2, epoch, seed=0, groups=data.groups)
        assert sorted(k % 4 for b in batches for k in b) == [0, 1, 2, 3] and len(batches) == 3
        for ks in batches:
            batch = collate([data[k] for k in ks])
            w, h = buckets[ks[0] % 4]
            assert {buckets[k % 4] for k in ks} == {(w, h)}
            assert batch["pixels"].shape == (2 * len(ks), 3, h, w)   # instance half, then class half
            shapes.append((w, h))
            crops = batch["crops"]
            assert all(int(c[0]) >= h and int(c[1]) >= w for c in crops)   # covers the bucket
            assert all(0 <= int(c[2]) <= int(c[0]) - h and 0 <= int(c[3]) <= int(c[1]) - w for c in crops)
            time_ids = SDXL().image_conditioning({"time_ids": torch.zeros(len(crops), 6)}, crops, (h, w))["time_ids"]
            assert torch.equal(time_ids, torch.cat([crops, torch.tensor([[h, w]] * len(crops))], 1).float())
    assert sorted(set(shapes)) == [(24, 40), (32, 32), (40, 24)]
    # the portrait image's crop: 24x48 after covering, 8 rows of slack, the row drawn per run position
    tops = {int(data[k]["instance_crop"][2]) for k in range(0, 40, 4)}
    assert len(tops) > 1 and data[0]["instance_crop"][:2] == (48, 24)


def test_batch_order_is_a_function_of_seed_and_epoch_and_processes_get_equal_shares():
    groups = [(24, 40), (40, 24), (32, 32), (24, 40), (24, 40), (40, 24), (40, 24)]
    a = epoch_batches(7, 2, 3, seed=5, groups=groups)
    assert a == epoch_batches(7, 2, 3, seed=5, groups=groups)
    orders = {str([[k % 7 for k in b] for b in epoch_batches(7, 2, e, 5, groups=groups)]) for e in range(4)}
    assert len(orders) > 1   # epochs shuffle
    assert all(len({groups[k % 7] for k in b}) == 1 for b in a) and sorted(k - 21 for b in a for k in b) == \
        list(range(7))
    shards = [epoch_batches(7, 2, 3, 5, p, 2, groups) for p in range(2)]
    assert len(shards[0]) == len(shards[1]) == steps_per_epoch(7, 2, 1, 2, groups) == 3   # 5 batches, padded to 6
    assert shards[0][0] == a[0] and shards[1][0] == a[1] and shards[1][2] == a[0]   # dealt in turn, wrapped
    assert epoch_batches(7, 2, 3, seed=5) == epoch_batches(7, 2, 3, seed=5, groups=None)   # off: today's batches


def test_bucketed_run_is_deterministic_resumes_exactly_and_caches_exactly(tmp_path, monkeypatch):
    """Tiny SD, 4 mixed images with prior preservation: a run killed after step 2 (its first two steps a rerun of the
    straight run's) and resumed ends as the straight one, bit for bit; a cached run (--center_crop) equals the
    uncached one."""
    data = subject_dir(tmp_path / "subject")
    classes = tmp_path / "classes"
    classes.mkdir()
    for i, img in enumerate(noise_images([(32, 32)] * 2, seed=1)):
        img.save(classes / f"{i}.png")
    prior = ["--with_prior_preservation", "--class_data_dir", str(classes), "--num_class_images", "2",
             "--class_prompt", "a photo of cat"]
    args = [*FAST, *data, *BUCKETS, *prior, "--train_batch_size", "2"]

    def train(out, *extra):
        return dreambooth.main(["--output_dir", str(out), *args, *extra])

    check_resume_after_a_kill(train, tmp_path, monkeypatch)   # straight, killed, resumed: 4 steps of delora
    straight = tmp_path / "straight"
    run = json.loads((straight / "run.json").read_text())
    assert run["aspect_buckets"] == {"24x40": 2, "32x32": 1, "40x24": 1} and run["steps_per_epoch"] == 3
    assert (run["args"]["enable_bucket"], run["args"]["bucket_reso_steps"], run["args"]["min_bucket_reso"],
            run["args"]["max_bucket_reso"]) == (True, 8, 16, 64)
    assert "aspect_buckets=" in (straight / "README.md").read_text()
    again = ["--method", "delora", "--max_train_steps", "4", "--checkpointing_steps", "2", "--skip_final_samples"]
    assert train(tmp_path / "centre", *again, "--center_crop") == 0
    assert train(tmp_path / "cached", *again, "--center_crop", "--cache_latents") == 0
    same_adapter(tmp_path / "centre", tmp_path / "cached")


@pytest.mark.parametrize("flags, says", [
    (["--min_bucket_reso", "16"], "add --enable_bucket"),
    (["--enable_bucket", "--bucket_reso_steps", "0"], "must be positive"),
    (["--enable_bucket", "--min_bucket_reso", "48"], "--min_bucket_reso <= --resolution"),
    (["--enable_bucket", "--cache_latents"], "needs --center_crop"),
])
def test_bad_bucket_flags_are_one_line_and_write_nothing(tmp_path, capsys, flags, says):
    out = tmp_path / "out"
    assert dreambooth.main(["--output_dir", str(out), *FAST, "--max_train_steps", "1", *flags]) == 2
    assert says in one_error_line(capsys)
    assert not out.exists()


def test_help_lists_the_flags():
    text = dreambooth.build_parser().format_help()
    assert all(f in text for f in ("--enable_bucket", "--bucket_reso_steps", "--min_bucket_reso", "--max_bucket_reso"))
