"""Metric models by hub name with no hub: the local cache is tried once (local_files_only=True), the hub is
probed at most once per process, and the one error line names the flag that takes a local folder. Before
this, an unreachable hub cost the hub client's 5 retries (~24 s) per model. No network is touched: the
loaders and the probe's socket are replaced, and every attempt is counted."""
from __future__ import annotations

import argparse

import pytest
import transformers

from eval import EvalError, embed
from eval.embed import ClipEmbedder, DinoEmbedder
from eval.robustness_tasks import prepare_subject

from .test_eval_support import tiny_models  # noqa: F401


@pytest.fixture
def attempts(monkeypatch):
    """Every AutoConfig.from_pretrained call (its local_files_only) and every probe of the hub, counted.
    Not in the cache: local_files_only=True raises as transformers does; the hub itself answers 404."""
    seen = {"config": [], "probe": 0}

    def from_pretrained(name, *args, local_files_only=False, **kwargs):
        seen["config"].append(local_files_only)
        if local_files_only:
            raise OSError(f"We couldn't connect to 'https://huggingface.co' to load the files of {name}, and "
                          f"couldn't find them in the cached files.")
        raise OSError(f"{name} is not a local folder and is not a valid model identifier (404)")

    def probe(address, timeout=None):
        seen["probe"] += 1
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", from_pretrained)
    monkeypatch.setattr(embed.socket, "create_connection", probe)
    monkeypatch.setattr(embed, "_REACHABLE", {})
    monkeypatch.setattr(embed.urllib.request, "getproxies", dict)
    return seen


def hub_on(monkeypatch):
    """HF_HUB_OFFLINE unset, as on a machine whose network is simply down."""
    import huggingface_hub.constants

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def test_switched_off_hub_is_one_local_attempt_and_names_the_flag(attempts, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EvalError) as info:
        DinoEmbedder("nobody/dino-not-in-any-cache")
    assert attempts["config"] == [True]          # one attempt, from the cache only
    assert attempts["probe"] == 0                 # switched off: not even a probe
    msg = str(info.value)
    assert "\n" not in msg and "offline (HF_HUB_OFFLINE=1)" in msg
    assert "not in the local model cache" in msg and "pass --dino_model DIR" in msg


def test_unreachable_hub_is_probed_once_for_both_models(attempts, monkeypatch):
    """eval.robustness's check before the sweep: DINO and CLIP each tried once from the cache, the hub
    probed once in all, and the study's note names both flags."""
    hub_on(monkeypatch)
    note = prepare_subject(argparse.Namespace(dino_model="nobody/dino-x", clip_model="nobody/clip-x"))
    assert attempts["config"] == [True, True] and attempts["probe"] == 1
    assert note.startswith("scores unavailable: the metric models did not load (")
    assert "offline (no connection to huggingface.co)" in note
    assert "pass --dino_model DIR" in note and "pass --clip_model DIR" in note


def test_reachable_hub_is_asked_after_a_cache_miss(attempts, monkeypatch):
    """Online, a model not yet cached still downloads: the cache first, then the hub (whose own error shows)."""
    hub_on(monkeypatch)
    monkeypatch.setattr(embed.socket, "create_connection", lambda address, timeout=None: type(
        "Conn", (), {"close": lambda self: None})())
    with pytest.raises(EvalError, match=r"cannot load --clip_model 'nobody/clip-x': .*404"):
        ClipEmbedder("nobody/clip-x")
    assert attempts["config"] == [True, False]


def test_a_cached_model_loads_without_the_hub(monkeypatch):
    hub_on(monkeypatch)
    monkeypatch.setattr(embed, "_REACHABLE", {})
    monkeypatch.setattr(embed.socket, "create_connection", lambda *a, **k: pytest.fail("the hub was probed"))
    calls = []
    assert embed.offline_first("--dino_model", "org/cached", lambda local: calls.append(local) or "model") == "model"
    assert calls == [True]


def test_a_local_folder_never_asks_the_hub(tiny_models, monkeypatch):  # noqa: F811
    hub_on(monkeypatch)
    monkeypatch.setattr(embed.socket, "create_connection", lambda *a, **k: pytest.fail("the hub was probed"))
    assert DinoEmbedder(str(tiny_models["dino"])).config.model_type == "vit"
    with pytest.raises(EvalError, match="--dino_model ./no/such/folder does not exist"):
        DinoEmbedder("./no/such/folder")
