"""DINO and CLIP embeddings, loaded by hub name or local folder through transformers.

Each embedder caches its embeddings by image content (and CLIP's by text), so scoring many
checkpoints against the same real photos embeds those photos once per model.

    dino = DinoEmbedder("facebook/dino-vits16");  dino.images([img, ...])      # (n, d) unit rows
    clip = ClipEmbedder("openai/clip-vit-large-patch14");  clip.images(...), clip.texts([...])
"""
from __future__ import annotations

import os
import socket
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

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


# ----- loading by hub name or local folder: the local cache first, the hub once, never a retry storm ----------
_TRUE = ("1", "true", "yes", "on")
_REACHABLE: dict[str, bool] = {}   # hub endpoint -> could one TCP connection be opened (probed once per process)


def hub_switched_off() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, as the environment or huggingface_hub (read at its import) says."""
    if any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _endpoint() -> tuple[str, str, int]:
    """(shown name, host, port) to probe: the hub's endpoint, or the proxy requests would go through."""
    try:
        from huggingface_hub import constants
        url = urlsplit(constants.ENDPOINT)
    except (ImportError, AttributeError, ValueError):
        url = urlsplit("https://huggingface.co")
    host = url.hostname or "huggingface.co"
    proxy = urllib.request.getproxies().get(url.scheme) or urllib.request.getproxies().get("all")
    if proxy and not urllib.request.proxy_bypass(host):
        p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        return f"{host} (through the proxy {p.hostname})", p.hostname or host, p.port or 80
    return host, host, url.port or (443 if url.scheme == "https" else 80)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether one TCP connection to the hub (or its proxy) opens within `timeout` s; probed once per process,
    so a second model (CLIP after DINO) does not wait again."""
    shown, host, port = _endpoint()
    if shown not in _REACHABLE:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            _REACHABLE[shown] = True
        except OSError:
            _REACHABLE[shown] = False
    return _REACHABLE[shown]


def hub_unavailable() -> str | None:
    """Why the hub cannot be asked (switched off, or unreachable), or None when it can."""
    if hub_switched_off():
        return "offline (HF_HUB_OFFLINE=1)"
    if not hub_reachable():
        return f"offline (no connection to {_endpoint()[0]})"
    return None


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1   # a path, not a hub id (org/name)


def _cached(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:   # an invalid repo id, an old huggingface_hub: not cached as far as we can tell
        return False


def offline_first(flag: str, name: str, load):
    """load(local_files_only) for a local folder or a hub name: a hub name is read from the local cache first
    (no network at all when it is there) and the hub is asked only if it is on and reachable; when it is not,
    one EvalError naming `flag` at once instead of the hub client's retries (5 of them, ~24 s per model)."""
    if Path(name).expanduser().exists():
        return load(False)
    if _looks_like_path(name):
        raise EvalError(f"{flag} {name} does not exist")
    try:
        return load(True)
    except Exception as e:
        why = hub_unavailable()
        if why is None:
            pass          # not (completely) in the cache and the hub answers: download below
        elif _cached(name):
            raise load_error(flag, name, e) from None   # in the cache but not loadable: that error, not "offline"
        else:
            raise EvalError(f"{flag} {name!r} is not in the local model cache and the hub is {why}: pass {flag} "
                            f"DIR, a local model folder (written by save_pretrained), or run once online to cache "
                            f"it") from None
    return load(False)


def load_error(flag: str, name: str, error: BaseException) -> EvalError:
    """One line saying why a model did not load and what to pass instead."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    if Path(name).expanduser().exists():
        return EvalError(f"{flag} {name} is not a transformers model folder ({first}); expected a folder "
                         f"written by save_pretrained (config.json + weights)")
    if _looks_like_path(name):
        return EvalError(f"{flag} {name} does not exist")
    return EvalError(f"cannot load {flag} {name!r}: {first}")


def load_model(flag: str, name: str, auto_class=None, model_kwargs=None):
    """(config, model in eval mode) by hub name or local folder (offline_first); EvalError if it is not a model.
    model_kwargs(config) -> extra from_pretrained arguments that depend on the model type."""
    from transformers import AutoConfig, AutoModel

    def load(local_only: bool):
        config = AutoConfig.from_pretrained(name, local_files_only=local_only)
        extra = model_kwargs(config) if model_kwargs else {}
        return config, (auto_class or AutoModel).from_pretrained(name, local_files_only=local_only, **extra)

    try:
        config, model = offline_first(flag, name, load)
    except EvalError:
        raise
    except Exception as e:   # OSError, ValueError, safetensors' own errors...: all mean "not a usable model"
        raise load_error(flag, name, e) from None
    return config, model.eval()


def load_processor(flag: str, name: str, kind: str = "image"):
    from transformers import AutoImageProcessor, AutoTokenizer

    auto = AutoImageProcessor if kind == "image" else AutoTokenizer
    try:
        return offline_first(flag, name, lambda local_only: auto.from_pretrained(name, local_files_only=local_only))
    except EvalError:
        raise
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
