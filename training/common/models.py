"""The offline tiny SD preset (random weights), the cache it is built into, and the model-loading error.

    tiny_path()                      # the tiny SD pipeline folder, built on first use
    built_once(folder, build)        # any preset's folder (training.families builds theirs through it)

Pipelines load through training.families (load_pipeline / load_family: the family of a preset, a folder or a
hub name). The tiny preset is built from configs once into a cache directory ($LOWRANK_CACHE, default
~/.cache/lowrank) and then loaded back through `StableDiffusionPipeline.from_pretrained`, so every
run, test and demo exercises the same loading path as a real checkpoint. Its weights are random: it
shows the machinery (shapes, adapters, checkpoints, distances), never image quality.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from . import TrainingError

TINY = "tiny"
TINY_VERSION = "v1"   # bump when the recipe below changes, so stale caches are not reused


class ModelLoadError(TrainingError, OSError):
    """A model name or path that cannot be loaded; the message is one line that says what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get("LOWRANK_CACHE") or Path.home() / ".cache" / "lowrank").expanduser()


def is_tiny(name_or_path: str | None) -> bool:
    """The built-in preset: no name, an empty one, or 'tiny' (surrounding spaces from a form ignored)."""
    return str(name_or_path or "").strip() in ("", TINY)


# ----- the tokenizer: a real byte-level BPE vocabulary written by the project -----------------------
# Words of DreamBooth-style prompts (the 25 recontextualisation prompts of the DreamBooth paper and the
# class names of its dataset) get whole-word merges; anything else still tokenizes to real ids, one
# per character, because every byte-level character is in the vocabulary. Nothing maps to unknown.
PROMPT_WORDS = """
a an the of in on with and at by for to from top front under near inside its it is photo picture
image painting drawing sketch rendering close up view sks qwe zwx cat dog puppy kitten backpack bowl
can candle clock glasses teapot toy vase boot sneaker stuffed animal duck monster robot berry
cartoon person man woman face portrait jungle snow beach cobblestone street pink fabric wooden
floor city background mountain blue house purple rug forest wheat field tree autumn leaves eiffel
tower floating water ocean milk green grass sunflowers around mirror sidewalk crowded dirt road
white red shiny wet cube shaped black yellow orange brown gray sitting standing lying high quality
detailed
""".split()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character map (the ByteLevel pre-tokenizer's)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tokenizer_files(directory: Path) -> int:
    """Write vocab.json + merges.txt for CLIPTokenizer.from_pretrained; returns the vocabulary size."""
    chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for tok in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(tok, len(vocab))
    merges: list[str] = []
    for word in dict.fromkeys(PROMPT_WORDS):    # left-to-right merge chain per word: p h -> ph, ph o -> pho ...
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            merged = left + right
            if merged not in vocab:
                merges.append(f"{left} {right}")
                vocab[merged] = len(vocab)
            left = merged
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)


# ----- the tiny preset ------------------------------------------------------------------------------
def build_tiny(directory: Path) -> None:
    """Build the tiny SD pipeline from configs (fixed seed) and save it with save_pretrained."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tok_dir:
        vocab_size = write_tokenizer_files(Path(tok_dir))
        # transformers 5: the keyword constructor silently builds an empty vocabulary; load from files
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)
    with torch.random.fork_rng(devices=[]):   # leave the caller's RNG untouched
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32)
        torch.manual_seed(0)
        vae = AutoencoderKL(   # two blocks: 2x spatial downsampling
            block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
            up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], sample_size=64)
        torch.manual_seed(0)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
            vocab_size=vocab_size, max_position_embeddings=77, layer_norm_eps=1e-5,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(directory)
    # transformers 5 writes weights only on rank 0 once torch.distributed is initialised: never let such a
    # partial folder become the cache (trainers build it on the main process first)
    for part in ("unet", "vae", "text_encoder"):
        if not any((directory / part).glob("*.safetensors")):
            raise ModelLoadError(f"building the tiny preset wrote no {part} weights (a non-zero distributed rank?); "
                                 f"build it on the main process first")
    (directory / "README.md").write_text(
        "lowrank tiny SD preset: random weights, built from configs. For tests and demos of the "
        "training machinery; its images are noise.\n")


def built_once(final: Path, build) -> Path:
    """`final`, built by build(folder) on first use: in a temporary folder renamed into place, so a crash never
    leaves half a model and concurrent builders are safe (the first rename wins). A folder with
    model_index.json counts as built."""
    if (final / "model_index.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "model_index.json").is_file():   # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def tiny_path() -> Path:
    """The tiny preset's folder, built on first use (built_once)."""
    return built_once(cache_dir() / f"tiny-sd-{TINY_VERSION}", build_tiny)
