import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """One tiny-SD cache for the whole session ($LOWRANK_CACHE): built once, shared by every module and by the
    trainer subprocesses (they inherit the environment)."""
    path = tmp_path_factory.getbasetemp() / "lowrank-cache"
    old = os.environ.get("LOWRANK_CACHE")
    os.environ["LOWRANK_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("LOWRANK_CACHE", None)
    else:
        os.environ["LOWRANK_CACHE"] = old
