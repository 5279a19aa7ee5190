"""Local data and models through the real loaders, offline: `datasets` folders (save_to_disk, parquet, an
imagefolder with metadata.jsonl) via --dataset_name in DreamBooth and the semantic-map trainer, a ControlNet
saved with save_pretrained via --controlnet_model_name_or_path, and an SD-1.5-layout pipeline folder with a
safety checker. Every source is a tiny seeded folder the test builds."""
import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from tests.stderr import one_error_line
from training import dreambooth
from training import semantic_map as sm
from training.export import main as export_cli
from training.exporting import export_run
from training.families import load_pipeline
from training.images.files import load_dataset_images, load_image_dir
from training.segmap import data as sd

pytestmark = pytest.mark.usefixtures("tiny_cache")   # conftest: one tiny-SD cache for the session

FORMATS = ("save_to_disk", "parquet", "imagefolder")
DB_FAST = ["--max_train_steps", "2", "--checkpointing_steps", "2", "--seed", "0", "--resolution", "32",
           "--num_inference_steps", "1", "--num_validation_images", "1", "--rank", "4", "--report_to", "none"]
SM_FAST = ["--max_train_steps", "2", "--checkpointing_steps", "2", "--method", "lora", "--rank", "4", "--seed", "0",
           "--resolution", "32", "--num_inference_steps", "1", "--num_validation_images", "1",
           "--num_validation_maps", "1", "--report_to", "none"]


def photos(n=3, size=(40, 36), seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def write_source(root, fmt, columns: dict, image_columns=("image",)):
    """The same table in one of the three layouts; columns: {name: [PIL images or strings]}."""
    if fmt == "imagefolder":   # files + metadata.jsonl: 'file_name' -> image, '<x>_file_name' -> image column x
        root.mkdir(parents=True)
        n = len(next(iter(columns.values())))
        rows = [{} for _ in range(n)]
        for name, values in columns.items():
            for i, v in enumerate(values):
                if name in image_columns:
                    v.save(root / f"{name}{i}.png")
                    rows[i]["file_name" if name == "image" else f"{name}_file_name"] = f"{name}{i}.png"
                else:
                    rows[i][name] = v
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return root
    features = datasets.Features({k: datasets.Image() if k in image_columns else datasets.Value("string")
                                  for k in columns})
    table = datasets.Dataset.from_dict(columns, features=features)
    if fmt == "save_to_disk":
        table.save_to_disk(str(root))
    else:
        root.mkdir(parents=True)
        table.to_parquet(str(root / "train-00000-of-00001.parquet"))
    return root


@pytest.mark.parametrize("fmt", FORMATS)
def test_dreambooth_images_and_captions_from_each_layout_equal_the_files(tmp_path, fmt):
    pics = photos()
    (tmp_path / "dir").mkdir()
    for i, p in enumerate(pics):
        p.save(tmp_path / "dir" / f"{i}.png")
    src = write_source(tmp_path / fmt, fmt, {"image": pics, "text": [f"sks cat {i}" for i in range(3)]})
    images, captions = load_dataset_images(str(src), 32, "image", "text", cache_dir=str(tmp_path / "cache"))
    want = load_image_dir(tmp_path / "dir", 32)   # the same photos through --instance_data_dir
    assert [np.asarray(a).tolist() for a in images] == [np.asarray(b).tolist() for b in want]
    assert captions == ["sks cat 0", "sks cat 1", "sks cat 2"]


def checker_pipeline(folder):
    """The tiny SD saved in SD-1.5's hub layout with a safety checker and its feature extractor."""
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    tiny = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(CLIPConfig(text_config=dict(tiny, vocab_size=1000),
                                                      vision_config=dict(tiny, image_size=32, patch_size=4),
                                                      projection_dim=32))
    extractor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    parts = {**load_pipeline("tiny").components, "safety_checker": checker, "feature_extractor": extractor}
    StableDiffusionPipeline(**parts, requires_safety_checker=True).save_pretrained(folder)
    return folder


def test_dreambooth_trains_from_a_parquet_dataset_with_captions_on_a_pipeline_with_a_safety_checker(tmp_path):
    base = checker_pipeline(tmp_path / "sd15-layout")
    index = json.loads((base / "model_index.json").read_text())
    assert index["safety_checker"] == ["stable_diffusion", "StableDiffusionSafetyChecker"]
    assert index["feature_extractor"] == ["transformers", "CLIPImageProcessor"]
    src = write_source(tmp_path / "data", "parquet", {"image": photos(), "text": ["sks cat", "sks cat sits", "x"]})
    out = tmp_path / "run"
    assert dreambooth.main(["--output_dir", str(out), "--pretrained_model_name_or_path", str(base),
                            "--dataset_name", str(src), "--caption_column", "text", "--instance_prompt", "sks cat",
                            "--cache_dir", str(tmp_path / "cache"), *DB_FAST]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["instance_images"] == 3 and info["caption_source"] == "data"
    assert len(list((out / "samples").glob("*.png"))) == 1   # one prompt x --num_validation_images 1
    # the checker came with the pipeline the trainer loaded, and a merged export keeps it
    export_run(out, tmp_path / "merged", "pipeline")
    merged = json.loads((tmp_path / "merged" / "model_index.json").read_text())
    assert merged["safety_checker"] == index["safety_checker"]
    # --format merged is the language runs' (a transformers folder): one line pointing at --format pipeline
    assert export_cli([str(out), "--format", "merged", "--output", str(tmp_path / "m")]) == 2
    assert not (tmp_path / "m").exists()


def test_dreambooth_captions_change_what_is_trained(tmp_path):
    """Same data and seed; per-image captions instead of the one instance prompt give a different loss."""
    src = write_source(tmp_path / "data", "save_to_disk", {"image": photos(), "text": ["a", "b", "c"]})
    losses = []
    for extra in ([], ["--caption_column", "text"]):
        out = tmp_path / f"run{len(extra)}"
        assert dreambooth.main(["--output_dir", str(out), "--dataset_name", str(src), "--instance_prompt", "sks cat",
                                "--export_diffusers", "false", *DB_FAST, *extra]) == 0
        losses.append(json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"])
    assert losses[0] != losses[1]


def seg_columns(n=2, seed=1):
    rng = np.random.default_rng(seed)
    labels = [rng.choice(np.array((0, 1, 4, 13, 150), np.uint8), size=(36, 40)) for _ in range(n)]
    return photos(n, seed=seed), labels


@pytest.mark.parametrize("fmt", [*FORMATS, "imagefolder, map paths"])
def test_semantic_map_pairs_from_each_layout_equal_the_files(tmp_path, fmt):
    pics, labels = seg_columns()
    maps = [sd.paint(lab) for lab in labels]   # painted maps, as diffusers' ControlNet sets hold them
    src = tmp_path / "data"
    if fmt == "imagefolder, map paths":   # diffusers' fill50k layout: the map column holds paths
        write_source(src, "imagefolder", {"image": pics, "text": ["c0", "c1"]})
        rows = [json.loads(line) for line in (src / "metadata.jsonl").read_text().splitlines()]
        for i, (row, m) in enumerate(zip(rows, maps)):
            m.save(src / f"map{i}.png")
            row["conditioning_image"] = f"map{i}.png"
        (src / "metadata.jsonl").write_text("".join(json.dumps({"file_name": r["file_name"], "conditioning_image":
                                                                r["conditioning_image"], "text": r["text"]}) + "\n"
                                                    for r in rows))
    else:
        write_source(src, fmt, {"image": pics, "conditioning_image": maps, "text": ["c0", "c1"]},
                     image_columns=("image", "conditioning_image"))
    args = sm.parse_args(["--dataset_name", str(src), "--cache_dir", str(tmp_path / "cache"),
                          "--image_column", "image", "--conditioning_image_column", "conditioning_image",
                          "--caption_column", "text", "--output_dir", str(tmp_path / "o"), *SM_FAST]).args
    train, val, source = sm.load_data(args)
    assert [ex.caption for ex in train] == ["c0", "c1"] and len(val) == 1 and str(src) in source
    for ex, pic, label in zip(train, pics, labels):
        img, lab = ex.load()
        assert np.array_equal(np.asarray(img), np.asarray(pic)) and np.array_equal(lab, label)


def tiny_controlnet(folder, hint_widths=(16, 32)):
    """A ControlNet of the tiny UNet (hint block: one stride-2 stage per halving of its 2x VAE), its zero
    convolutions given seeded weights so that it changes the UNet's output, saved with save_pretrained."""
    from diffusers import ControlNetModel

    torch.manual_seed(0)
    net = ControlNetModel.from_unet(load_pipeline("tiny").unet, conditioning_embedding_out_channels=hint_widths)
    with torch.no_grad():
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            conv.weight.normal_(0, 0.1)
    net.save_pretrained(folder)
    return folder


def test_semantic_map_with_a_local_controlnet_trains_the_adapter_only(tmp_path):
    """On the SD-1.5-layout folder with a safety checker too: the semantic-map trainer loads it as DreamBooth does."""
    from diffusers import ControlNetModel

    from training.segmap.conditioning import ConditionedUNet

    base = checker_pipeline(tmp_path / "sd15-layout")
    net_dir = tiny_controlnet(tmp_path / "controlnet")
    pics, labels = seg_columns()
    src = write_source(tmp_path / "data", "save_to_disk", {"image": pics, "conditioning_image":
                                                           [sd.paint(x) for x in labels], "text": ["c0", "c1"]},
                       image_columns=("image", "conditioning_image"))
    out = tmp_path / "run"
    assert sm.main(["--output_dir", str(out), "--dataset_name", str(src), "--controlnet_model_name_or_path",
                    str(net_dir), "--pretrained_model_name_or_path", str(base), *SM_FAST]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["conditioning"] == "controlnet" and info["conditioning_encoder_parameters"] == 0
    assert info["train_pairs"] == 2 and info["caption_source"] == "data"
    assert info["args"]["pretrained_model_name_or_path"] == str(base)
    assert not (out / "conditioning_encoder.safetensors").exists() and (out / "adapter.safetensors").is_file()
    # the hook adds exactly the ControlNet's residuals to the UNet it feeds
    unet, net = load_pipeline("tiny").unet, ControlNetModel.from_pretrained(net_dir)
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 16, 16, generator=gen), torch.tensor([10])
    text, control = torch.randn(1, 77, 32, generator=gen), torch.rand(1, 3, 32, 32, generator=gen)
    with torch.no_grad():
        down, mid = net(x, t, encoder_hidden_states=text, controlnet_cond=control, return_dict=False)
        want = unet(x, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        plain = unet(x, t, text).sample
        got = ConditionedUNet(unet, controlnet=net)(x, t, text, control)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.allclose(got, plain)   # the ControlNet does act



def test_bad_dataset_sources_are_one_error_line_naming_the_flag(tmp_path, capsys):
    pics = photos(2)
    good = write_source(tmp_path / "good", "save_to_disk", {"image": pics, "text": ["a", "b"]})
    empty = tmp_path / "empty_set"
    datasets.Dataset.from_dict({"image": [], "text": []}, features=datasets.Features(
        {"image": datasets.Image(), "text": datasets.Value("string")})).save_to_disk(str(empty))
    (tmp_path / "bare").mkdir()
    cases = {
        "missing column": (["--dataset_name", str(good), "--image_column", "photo"], "--image_column"),
        "missing caption column": (["--dataset_name", str(good), "--caption_column", "prompt"], "--caption_column"),
        "empty dataset": (["--dataset_name", str(empty)], "is empty"),
        "wrong folder": (["--dataset_name", str(tmp_path / "nope")], "does not exist"),
        "empty folder": (["--dataset_name", str(tmp_path / "bare")], "empty folder"),
    }
    for name, (argv, words) in cases.items():
        out = tmp_path / f"o-{len(name)}"
        capsys.readouterr()
        assert dreambooth.main(["--output_dir", str(out), "--instance_prompt", "p", *DB_FAST, *argv]) == 2, name
        line = one_error_line(capsys)
        assert "--dataset_name" in line and words in line, (name, line)
        assert not out.exists(), name   # bad data stops the run before its folder is made
    # semantic map: a ControlNet made for another VAE, and a missing conditioning column
    net_dir = tiny_controlnet(tmp_path / "cn8x", hint_widths=(16, 32, 96, 256))
    pics, labels = seg_columns()
    columns = {"image": pics, "conditioning_image": [sd.paint(x) for x in labels], "text": ["a", "b"]}
    seg = write_source(tmp_path / "seg", "parquet", columns, image_columns=("image", "conditioning_image"))
    for argv, words in ((["--controlnet_model_name_or_path", str(net_dir)], "downsamples the control image 8x"),
                        (["--conditioning_image_column", "map"], "--conditioning_image_column"),
                        (["--controlnet_model_name_or_path", str(tmp_path / "bare")], "cannot load")):
        capsys.readouterr()
        assert sm.main(["--output_dir", str(tmp_path / "s"), "--dataset_name", str(seg), "--cache_dir",
                        str(tmp_path / "cache"), *SM_FAST, *argv]) == 2
        line = one_error_line(capsys)
        assert words in line and ("--controlnet_model_name_or_path" in line or "--dataset_name" in line), line
