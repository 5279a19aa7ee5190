"""DINO and CLIP embeddings, loaded by hub name or local folder through transformers.

Each embedder caches its embeddings by image content (and CLIP's by text), so scoring many
checkpoints against the same real photos embeds those photos once per model.

    dino = DinoEmbedder("facebook/dino-vits16");  dino.images([img, ...])      # (n, d) unit rows
    clip = ClipEmbedder("openai/clip-vit-large-patch14");  clip.images(...), clip.texts([...])
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import EvalError
from .images import image_key

DINO_MODEL = "facebook/dino-vits16"
CLIP_MODEL = "openai/clip-vit-large-patch14"


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise EvalError(f"--device {name!r} is not a torch device (try cpu, cuda, cuda:1)") from None


def load_error(flag: str, name: str, error: BaseException) -> EvalError:
    """One line saying why a model did not load and what to pass instead."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    path = Path(name).expanduser()
    if path.exists():
        return EvalError(f"{flag} {name} is not a transformers model folder ({first}); expected a folder "
                         f"written by save_pretrained (config.json + weights)")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:   # a path, not a hub id (org/name)
        return EvalError(f"{flag} {name} does not exist")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return EvalError(f"{flag} {name!r} cannot be reached: the hub is offline (HF_HUB_OFFLINE=1) and it is not "
                         f"in the cache; pass a local model folder")
    return EvalError(f"cannot load {flag} {name!r}: {first}")


def load_model(flag: str, name: str, auto_class=None, model_kwargs=None):
    """(config, model in eval mode) by hub name or local folder; EvalError if it is not a model.
    model_kwargs(config) -> extra from_pretrained arguments that depend on the model type."""
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(name)
        model = (auto_class or AutoModel).from_pretrained(name, **(model_kwargs(config) if model_kwargs else {}))
    except Exception as e:   # OSError, ValueError, safetensors' own errors...: all mean "not a usable model"
        raise load_error(flag, name, e) from None
    return config, model.eval()


def load_processor(flag: str, name: str, kind: str = "image"):
    from transformers import AutoImageProcessor, AutoTokenizer

    try:
        return (AutoImageProcessor if kind == "image" else AutoTokenizer).from_pretrained(name)
    except Exception as e:
        raise EvalError(f"{flag} {name}: no usable {kind} {'processor' if kind == 'image' else 'tokenizer'} "
                        f"saved with the model ({(str(e).splitlines() or [''])[0][:160]})") from None


def features(out) -> torch.Tensor:
    """transformers 5's get_*_features return an output whose pooler_output is the projected
    embedding; transformers 4 returned that tensor directly."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class Embedder:
    """Unit-norm embeddings with a cache keyed by image content."""

    flag = "--model"

    def __init__(self, name: str, device: str | torch.device = "cpu", batch_size: int = 16):
        self.name, self.device, self.batch_size = name, torch.device(device), max(1, batch_size)
        self.cache: dict[str, torch.Tensor] = {}

    def embed_batch(self, images) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def images(self, images, desc: str = "Embedding") -> torch.Tensor:
        """(n, d) float64 unit rows, one per image (duplicates and cached images embedded once)."""
        keys = [image_key(img) for img in images]
        todo = {k: img for k, img in zip(keys, images) if k not in self.cache}
        order = list(todo)
        for start in tqdm(range(0, len(order), self.batch_size), desc=f"{desc} ({Path(self.name).name})",
                          disable=len(order) <= self.batch_size, leave=False):
            chunk = order[start:start + self.batch_size]
            try:
                emb = self.embed_batch([todo[k] for k in chunk]).float()
            except EvalError:
                raise
            except Exception as e:   # a model of the wrong kind fails here, on its first batch
                first = (str(e).splitlines() or [type(e).__name__])[0][:160]
                raise EvalError(f"{self.flag} {self.name} cannot embed images ({first}); is it the right "
                                f"kind of model?") from None
            emb = torch.nn.functional.normalize(emb, dim=-1).cpu()
            self.cache.update(zip(chunk, emb))
        if not keys:
            raise EvalError("no images to embed")
        return torch.stack([self.cache[k] for k in keys]).double()


class DinoEmbedder(Embedder):
    """The CLS token of the last layer (DreamBooth's DINO metric; ViT-S/16 trained with DINO)."""

    flag = "--dino_model"

    def __init__(self, name: str = DINO_MODEL, device="cpu", batch_size: int = 16):
        super().__init__(name, device, batch_size)
        # ViT checkpoints of DINO have no pooler: ask for none instead of a randomly initialised one
        self.config, self.model = load_model(
            self.flag, name, model_kwargs=lambda c: {"add_pooling_layer": False} if c.model_type == "vit" else {})
        self.model.to(self.device)
        self.processor = load_processor(self.flag, name)

    def embed_batch(self, images) -> torch.Tensor:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        return self.model(pixel_values=pixels).last_hidden_state[:, 0]


class ClipEmbedder(Embedder):
    """CLIP image and text embeddings (after the projections; compared by cosine, no logit scale)."""

    flag = "--clip_model"

    def __init__(self, name: str = CLIP_MODEL, device="cpu", batch_size: int = 16):
        super().__init__(name, device, batch_size)
        self.config, self.model = load_model(self.flag, name)
        if not (hasattr(self.model, "get_image_features") and hasattr(self.model, "get_text_features")):
            raise EvalError(f"--clip_model {name} is a {self.config.model_type} model, not CLIP "
                            f"(no get_image_features/get_text_features)")
        self.model.to(self.device)
        self.processor = load_processor(self.flag, name)
        self.tokenizer = load_processor(self.flag, name, kind="text")
        text_cfg = getattr(self.config, "text_config", None)
        self.max_length = min(self.tokenizer.model_max_length, getattr(text_cfg, "max_position_embeddings", 77))
        self.text_cache: dict[str, torch.Tensor] = {}

    def embed_batch(self, images) -> torch.Tensor:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        return features(self.model.get_image_features(pixel_values=pixels))

    @torch.inference_mode()
    def texts(self, texts: list[str]) -> torch.Tensor:
        """(n, d) float64 unit rows, one per text."""
        todo = list(dict.fromkeys(t for t in texts if t not in self.text_cache))
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            tokens = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length,
                                    return_tensors="pt").to(self.device)
            emb = features(self.model.get_text_features(input_ids=tokens["input_ids"],
                                                        attention_mask=tokens.get("attention_mask")))
            self.text_cache.update(zip(chunk, torch.nn.functional.normalize(emb.float(), dim=-1).cpu()))
        return torch.stack([self.text_cache[t] for t in texts]).double()
