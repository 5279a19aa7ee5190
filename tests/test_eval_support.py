"""Builders shared by the eval tests: tiny random DINO (ViT), CLIP and UperNet models saved with
save_pretrained (so eval loads them by path through the real from_pretrained), a fake trained run,
and small image folders. Nothing here touches the network."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

BPE_WORDS = "a photo of sks cat dog red blue in the snow on beach".split()


def write_bpe(directory: Path) -> None:
    """vocab.json + merges.txt for CLIPTokenizer.from_pretrained (transformers 5's keyword constructor
    silently builds an empty vocabulary). Every printable ASCII character is a token, with and without
    the end-of-word marker, so any prompt tokenizes; the test words get whole-word merges."""
    chars = [chr(c) for c in range(33, 127)]
    vocab: dict[str, int] = {}
    for tok in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(tok, len(vocab))
    merges = []
    for word in dict.fromkeys(BPE_WORDS):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            if left + right not in vocab:
                merges.append(f"{left} {right}")
                vocab[left + right] = len(vocab)
            left = left + right
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def build_dino(directory: Path) -> Path:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(1)
    model = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                               image_size=32, patch_size=16), add_pooling_layer=False)
    model.save_pretrained(directory)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def build_clip(directory: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    write_bpe(directory)
    tok = CLIPTokenizer.from_pretrained(directory, model_max_length=77)
    torch.manual_seed(2)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=2, num_hidden_layers=2,
                         vocab_size=len(tok), max_position_embeddings=77, **ids),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=2, num_hidden_layers=2,
                           image_size=32, patch_size=16),
        projection_dim=16))
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def build_upernet(directory: Path, num_labels: int = 150) -> Path:
    from transformers import ConvNextConfig, SegformerImageProcessor, UperNetConfig, UperNetForSemanticSegmentation

    torch.manual_seed(3)
    config = UperNetConfig(
        backbone_config=ConvNextConfig(num_channels=3, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                                       out_features=["stage1", "stage2", "stage3", "stage4"]),
        hidden_size=16, num_labels=num_labels, use_auxiliary_head=False, pool_scales=[1, 2, 3, 6],
        auxiliary_in_channels=24, auxiliary_channels=8)
    UperNetForSemanticSegmentation(config).save_pretrained(directory)
    SegformerImageProcessor(size={"height": 64, "width": 64}, do_reduce_labels=False).save_pretrained(directory)
    return directory


def random_image(seed: int, size=(40, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def write_generated(directory: Path, prompts: list[str], per_prompt: int = 2, seed: int = 100) -> list[dict]:
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, prompt in enumerate(prompts):
        for j in range(per_prompt):
            name = f"p{i:02d}-s{j}.png"
            random_image(seed + 10 * i + j).save(directory / name)
            rows.append({"image": name, "prompt": prompt, "seed": j})
    (directory / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def write_real(directory: Path, n: int = 3, seed: int = 0) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        paths.append(directory / f"real{i}.png")
        random_image(seed + i, size=(36 + 4 * i, 44)).save(paths[-1])
    return paths


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-models")
    return {"dino": build_dino(root / "dino"), "clip": build_clip(root / "clip")}


@pytest.fixture(scope="session")
def tiny_upernet(tmp_path_factory):
    return build_upernet(tmp_path_factory.mktemp("eval-seg") / "upernet")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread: with two, OpenMP's spin-waits dominate (and on a busy
    2-core machine cost ~8x). Restored afterwards for the rest of the suite."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
