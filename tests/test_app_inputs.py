"""app/inputs.py and app/commands.py: upload checks, file-name sanitising, form checks, the trainer
command line and the base-model check. No Gradio, no training."""
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from app import commands
from app.inputs import (
    InputError,
    check_form,
    check_images,
    cli_defaults,
    preview_images,
    sanitize_filename,
    save_images,
)
from training import dreambooth, semantic_map


def png(path, size=(40, 40), color=(200, 40, 40)):
    Image.new("RGB", size, color).save(path)
    return str(path)


def png_header_only(path, w, h):
    """A PNG whose header claims w x h (no pixel data): opening reads only this much."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))
    return str(path)


@pytest.fixture
def three(tmp_path):
    return [png(tmp_path / f"{i}.png", color=(i * 60, 90, 30)) for i in range(3)]


@pytest.mark.parametrize("name, expected", [
    ("../../etc/passwd", "passwd"), ("..\\..\\boot.ini", "boot"), ("my cat (1)!.PNG", "my_cat_1"),
    (".bashrc", "bashrc"), ("....png", "png"), ("", "image"), ("chat-été.jpg", "chat-ete"),
    ("a" * 200 + ".png", "a" * 60), ("x/..", "image"),
])
def test_sanitize_filename(name, expected):
    assert sanitize_filename(name) == expected


def test_valid_upload_is_reencoded_under_safe_names(tmp_path, three):
    weird = tmp_path / "my cat (1)!.jpg"
    Image.new("RGBA", (50, 30), (0, 0, 255, 128)).convert("RGB").save(weird, format="JPEG")
    images = check_images(three + [str(weird), three[0]])
    out = save_images(images, tmp_path / "run" / "instance_images")
    assert [p.name for p in out] == ["00_0.png", "01_1.png", "02_2.png", "03_my_cat_1.png", "04_0_2.png"]
    assert all(p.parent == tmp_path / "run" / "instance_images" for p in out)
    with Image.open(out[3]) as im:
        assert (im.format, im.mode, im.size) == ("PNG", "RGB", (50, 30))


@pytest.mark.parametrize("count, message", [(0, "Upload 3–20 images"), (2, "at least 3"), (21, "at most 20")])
def test_image_count(tmp_path, count, message):
    files = [png(tmp_path / f"{i}.png") for i in range(count)]
    with pytest.raises(InputError, match=message):
        check_images(files)


def test_non_image_is_refused(tmp_path, three):
    fake = tmp_path / "notes.png"
    fake.write_text("this is not an image")
    with pytest.raises(InputError, match="notes is not an image"):
        check_images(three + [str(fake)])
    text = tmp_path / "evil.sh"
    text.write_text("#!/bin/sh\nrm -rf /\n")
    with pytest.raises(InputError, match="evil is not an image"):
        check_images(three + [str(text)])
    assert preview_images(three + [str(fake), str(text)]) == three


def test_truncated_image_is_refused(tmp_path, three):
    bad = tmp_path / "cut.png"
    data = Path(three[0]).read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cut could not be decoded"):
        check_images(three + [str(bad)])


@pytest.mark.parametrize("w, h, message", [(7000, 7000, "7000×7000 pixels is too large"),
                                           (100_000, 100_000, "is too large")])
def test_huge_image_is_refused_before_decoding(tmp_path, three, w, h, message):
    huge = png_header_only(tmp_path / "huge.png", w, h)
    with pytest.raises(InputError, match=message):
        check_images(three + [huge])


def test_file_size_limit(tmp_path, three):
    big = tmp_path / "big.png"
    Image.effect_noise((300, 300), 64).convert("RGB").save(big)     # ~ 270 kB of noise
    with pytest.raises(InputError, match=r"big: 0\.\d MB is over the 0\.1 MB limit"):
        check_images(three + [str(big)], max_mb=0.1)


def test_unsupported_format(tmp_path, three):
    ico = tmp_path / "icon.ico"
    Image.new("RGB", (32, 32)).save(ico)
    with pytest.raises(InputError, match="ICO images are not accepted"):
        check_images(three + [str(ico)])


FORM = dict(methods=["lora", "dora"], class_noun="cat", token="sks", rank=4, learning_rate="", steps=3,
            checkpoint_every=1, delora_lambda=15, model="tiny")


def test_form_ok():
    f = check_form(**{**FORM, "class_noun": "  stuffed   animal ", "learning_rate": "1e-4"})
    assert f.instance_prompt == "a photo of sks stuffed animal" and f.class_prompt == "a photo of stuffed animal"
    assert (f.learning_rate, f.steps, f.rank) == (1e-4, 3, 4)
    assert check_form(**FORM).learning_rate is None           # blank: the trainer's per-method default


@pytest.mark.parametrize("change, message", [
    ({"steps": 0}, "Steps must be between 1"), ({"steps": -5}, "Steps must be between 1"),
    ({"steps": 2.5}, "Steps must be a whole number"), ({"steps": None}, "Steps must be a whole number"),
    ({"checkpoint_every": 0}, "Checkpoint interval"), ({"rank": 0}, "Rank"),
    ({"methods": []}, "Pick at least one method"), ({"methods": ["lora", "rm -rf"]}, "Unknown method"),
    ({"learning_rate": "fast"}, "Learning rate must be a number"), ({"learning_rate": "-1"}, "positive"),
    ({"token": "s k s"}, "Unique token"), ({"token": "cat"}, "differ from the class noun"),
    ({"class_noun": "../etc"}, "Class noun"), ({"delora_lambda": "nan"}, "λ"),
    ({"snr_gamma": -5}, "Min-SNR γ must be a positive number"), ({"noise_offset": "lots"}, "Noise offset must be"),
    ({"ema_decay": 1}, "EMA decay must be between 0 and 1"), ({"ema_decay": -0.5}, "EMA decay must be a positive"),
])
def test_form_errors(change, message):
    with pytest.raises(InputError, match=message):
        check_form(**{**FORM, **change})


def test_model_check(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert commands.check_model("") == commands.check_model("tiny") == "tiny"
    with pytest.raises(InputError, match="no such folder"):
        commands.check_model(str(tmp_path / "nowhere"))
    with pytest.raises(InputError, match="no model_index.json"):
        commands.check_model(str(tmp_path))
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    assert commands.check_model(str(tmp_path / "pipe")) == str((tmp_path / "pipe").resolve())
    with pytest.raises(InputError, match="not in the local Hugging Face cache"):
        commands.check_model("someone/not-a-cached-model")
    with pytest.raises(InputError, match="neither a hub name"):
        commands.check_model("bad name; rm -rf /")


def test_train_command_is_the_cli(tmp_path):
    form = check_form(**{**FORM, "methods": ["lora", "delora"], "learning_rate": "0.001", "resolution": 32,
                         "sample_steps": 2, "num_samples": 1})
    cmd = commands.train_command(form, "delora", tmp_path / "run", tmp_path / "run" / "instance_images")
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and "--num_processes" in cmd
    script = cmd.index(str(commands.trainer_script()))
    assert commands.trainer_script().name == "dreambooth.py"
    args = cmd[script + 1:]
    pairs = dict(zip(args[::2], args[1::2]))
    assert pairs["--method"] == "delora" and pairs["--delora_lambda"] == "15.0"
    assert pairs["--instance_prompt"] == "a photo of sks cat" and pairs["--class_prompt"] == "a photo of cat"
    assert pairs["--output_dir"] == str(tmp_path / "run") and pairs["--learning_rate"] == "0.001"
    sampling = (pairs["--resolution"], pairs["--num_inference_steps"], pairs["--num_validation_images"])
    assert sampling == ("32", "2", "1")
    assert "--pretrained_model_name_or_path" not in pairs     # tiny is the trainer's default
    lora = commands.train_command(form, "lora", tmp_path, tmp_path, launcher="python")
    assert "--delora_lambda" not in lora and lora[1] == str(commands.trainer_script())
    assert "--with_prior_preservation" not in lora
    prior = check_form(**{**FORM, "prior_preservation": True, "num_class_images": 8})
    cmd = commands.train_command(prior, "lora", tmp_path, tmp_path)
    assert cmd[cmd.index("--with_prior_preservation") + 1:][:2] == ["--num_class_images", "8"]


def test_the_advanced_section_reaches_the_trainer_as_its_flags(tmp_path):
    """Min-SNR γ and noise offset become the trainer's --snr_gamma / --noise_offset (parsed by the trainer's own
    parser to the same values); blank leaves the trainer's default run, with neither flag on the command."""
    plain = commands.train_command(check_form(**FORM), "delora", tmp_path, None, launcher="python")
    assert "--snr_gamma" not in plain and "--noise_offset" not in plain
    form = check_form(**{**FORM, "snr_gamma": 5, "noise_offset": "0.05"})
    for cmd in (commands.train_command(form, "delora", tmp_path, None, launcher="python"),
                commands.semantic_train_command(form, "delora", tmp_path, None, launcher="python")):
        args = cmd[2:]
        assert args[args.index("--snr_gamma") + 1] == "5.0" and args[args.index("--noise_offset") + 1] == "0.05"
    parsed = dreambooth.parse_args(commands.train_command(form, "delora", tmp_path, None, launcher="python")[2:])
    assert (parsed.args.snr_gamma, parsed.args.noise_offset) == (5.0, 0.05)


def test_ema_decay_reaches_both_trainers(tmp_path):
    """EMA decay becomes --ema_decay, parsed by the DreamBooth and semantic-map trainers to the same value."""
    form = check_form(**{**FORM, "ema_decay": "0.99"})
    cmd = commands.train_command(form, "lora", tmp_path, None, launcher="python")[2:]
    assert cmd[cmd.index("--ema_decay") + 1] == "0.99" and dreambooth.parse_args(cmd).args.ema_decay == 0.99
    cmd = commands.semantic_train_command(form, "lora", tmp_path, None, launcher="python")[2:]
    assert semantic_map.parse_args(cmd).args.ema_decay == 0.99
    assert "--ema_decay" not in commands.train_command(check_form(**FORM), "lora", tmp_path, None)


def test_latents_are_cached_only_where_exact(tmp_path):
    """On by default, --cache_latents goes on the command only where every subject image is square (the embedded
    example, square uploads): there the cache gives the trainer's uncached adapter bit for bit. A photo of another
    shape has a random crop per step, so the run goes without the cache (the trainer would refuse it). The
    semantic-map trainer centre-crops every pair: cached whenever on. Off: never."""

    square, photo = tmp_path / "square", tmp_path / "photo"
    for folder, sizes in ((square, [(48, 48), (64, 64)]), (photo, [(48, 48), (64, 48)])):
        folder.mkdir()
        for i, size in enumerate(sizes):
            Image.new("RGB", size, (i * 90, 40, 200)).save(folder / f"{i}.png")
    on, off = check_form(**FORM), check_form(**{**FORM, "cache_latents": False})
    assert on.cache_latents and not off.cache_latents

    def cached(form, folder):
        cmd = commands.train_command(form, "lora", tmp_path / "run", folder, launcher="python")[2:]
        return dreambooth.parse_args(cmd).args.cache_latents

    assert cached(on, None) and cached(on, square)
    assert not cached(on, photo) and not cached(off, None) and not cached(off, square)
    for form in (on, off):
        cmd = commands.semantic_train_command(form, "lora", tmp_path / "run", None, launcher="python")[2:]
        assert semantic_map.parse_args(cmd).args.cache_latents is form.cache_latents


def test_the_train_tabs_defaults_are_the_clis(monkeypatch):
    """The form starts where the README's first command does: its method, and what the trainer resolves for it
    with no other flag (rank, λ, run length, checkpoint interval)."""
    import re

    from lowrank import AdapterConfig
    from training.common.args import MAX_STEPS_ENV
    from training.subject import args as subject_args

    monkeypatch.delenv(MAX_STEPS_ENV, raising=False)
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    headline = re.search(r"accelerate launch training/dreambooth\.py --method (\w+)", readme).group(1)
    steps, checkpoints = subject_args.DEFAULT_STEPS
    assert cli_defaults() == {"method": headline, "rank": AdapterConfig().rank,
                              "delora_lambda": AdapterConfig().delora_lambda, "steps": steps,
                              "checkpoint_every": steps // checkpoints}
    assert (cli_defaults()["method"], cli_defaults()["rank"]) == ("delora", 8)


def test_the_embedded_subject_is_the_clis(tmp_path):
    """No upload: the trainer gets no --instance_data_dir and trains on its example subject, as the CLI does."""
    from training.subject.data import EXAMPLE_PROMPT

    form = check_form(**FORM)
    cmd = commands.train_command(form, "delora", tmp_path / "run", None, launcher="python")
    assert "--instance_data_dir" not in cmd
    args = dreambooth.parse_args(cmd[2:]).args
    assert args.instance_data_dir is None and args.instance_prompt == EXAMPLE_PROMPT == form.instance_prompt
