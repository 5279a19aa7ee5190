"""Shared helpers for the app's end-to-end tests (no tests here): a server on a free 127.0.0.1 port
that is always shut down, and subject images."""
from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import numpy as np
from PIL import Image

# what the e2e tests train: tiny preset, 32 px, 2 steps, a checkpoint every step, cheap samples
FAST = dict(rank=4, learning_rate="", steps=2, checkpoint_every=1, delora_lambda=15, model="tiny", seed=0,
            resolution=32, sample_steps=2, num_samples=1)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subject_images(folder: Path, n: int = 3) -> list[str]:
    """n small photos-like images (smooth colour gradients), one with an awkward file name."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    yy, xx = np.mgrid[0:48, 0:48] / 47.0
    for i in range(n):
        arr = np.stack([xx * 255, yy * 255, np.full_like(xx, 60 * i)], -1).astype(np.uint8)
        name = "my cat (1)!.png" if i == 0 else f"cat{i}.png"
        Image.fromarray(arr).save(folder / name)
        paths.append(str(folder / name))
    return paths


@contextlib.contextmanager
def running_app(runs_dir: Path, poll: float = 0.5, **flags):
    """Serve the app in this process (python -m app's own code path); yields (url, service)."""
    from app.__main__ import build_parser, serve

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    port = free_port()
    argv = ["--host", "127.0.0.1", "--port", str(port), "--runs_dir", str(runs_dir), "--poll", str(poll),
            "--cancel_grace", "5"]
    for k, v in flags.items():
        argv += [f"--{k}", str(v)]
    demo, service = serve(build_parser().parse_args(argv), block=False)
    try:
        yield f"http://127.0.0.1:{port}/", service
    finally:
        service.close()
        demo.close()
