"""eval.upernet101: mit-semseg's UperNet-101 in plain torch. The official layout's parameter count derived by
hand, (N, 150, H, W) logits, the official file names loaded back through the real loader (same outputs,
mit-semseg's SyncBN bookkeeping buffers accepted), mismatches and pickled code refused with one line,
mit-semseg's test preprocessing, and eval.segmentation --segmenter upernet101 end to end with mIoU over
all classes by default."""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval import EvalError
from eval import segmentation as seg
from eval import upernet101 as up
from eval.common import run_main

from .test_eval_support import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = dict(layers=(1, 1, 2, 1), width=4, fpn_dim=8, ppm_dim=8)   # same structure, small widths, 150 classes


def bottleneck_params(inplanes: int, planes: int, downsample: bool) -> int:
    """1x1 + 3x3 + 1x1 convs (no bias), BN weight+bias after each; a 1x1 + BN projection when needed."""
    n = inplanes * planes + 9 * planes * planes + planes * 4 * planes + 2 * (planes + planes + 4 * planes)
    return n + (inplanes * 4 * planes + 2 * 4 * planes if downsample else 0)


def test_official_layout_parameter_count_by_hand_and_logits_shape():
    stem = 3 * 64 * 9 + 64 * 64 * 9 + 64 * 128 * 9 + 2 * (64 + 64 + 128)
    encoder, inplanes = stem, 128
    for planes, blocks in ((64, 3), (128, 4), (256, 23), (512, 3)):
        encoder += bottleneck_params(inplanes, planes, True) + (blocks - 1) * bottleneck_params(4 * planes, planes,
                                                                                                   False)
        inplanes = 4 * planes
    c5, fpn, bn = 2048, 512, 2 * 512
    decoder = (4 * (c5 * 512 + bn)                              # PPM 1x1 convs, scales 1, 2, 3, 6
               + (c5 + 4 * 512) * fpn * 9 + bn                  # ppm_last_conv
               + (256 + 512 + 1024) * fpn + 3 * bn              # fpn_in laterals
               + 3 * (fpn * fpn * 9 + bn)                       # fpn_out
               + 4 * fpn * fpn * 9 + bn + fpn * 150 + 150)      # conv_last: fuse + classifier (with bias)
    model = up.UperNet101().eval()
    count = lambda m: sum(p.numel() for p in m.parameters())   # noqa: E731
    assert (encoder, decoder) == (42_623_936, 40_590_486)       # the numbers the module docstring states
    assert (count(model.encoder), count(model.decoder)) == (encoder, decoder)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)), (40, 50))
    assert out.shape == (2, 150, 40, 50) and torch.isfinite(out).all()


def random_bn_stats(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BN statistics, so a load that dropped them would change the outputs."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def save_official(model: up.UperNet101, folder: Path, sync_bn_buffers: bool = True) -> Path:
    """The two files as mit-semseg's train.py writes them (torch.save of each net's state_dict); its
    SynchronizedBatchNorm also saves _tmp_running_mean/_tmp_running_var/_running_iter per BN."""
    folder.mkdir(parents=True, exist_ok=True)
    for part, name in ((model.encoder, up.ENCODER_FILE), (model.decoder, up.DECODER_FILE)):
        state = part.state_dict()
        if sync_bn_buffers:
            for key in [k for k in state if k.endswith(".running_mean")]:
                base = key.rsplit(".", 1)[0]
                state[f"{base}._tmp_running_mean"] = state[key].clone()
                state[f"{base}._tmp_running_var"] = state[f"{base}.running_var"].clone()
                state[f"{base}._running_iter"] = torch.ones(1)
        torch.save(state, folder / name)
    return folder


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    torch.manual_seed(0)
    model = random_bn_stats(up.UperNet101(**TINY))
    return model, save_official(model, tmp_path_factory.mktemp("upernet101") / "ckpt")


def test_saved_state_dicts_load_back_with_the_same_outputs(tiny_files):
    model, folder = tiny_files
    loaded = up.load_upernet101(folder, **TINY)
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x, (30, 40)), model(x, (30, 40)))
    assert not loaded.training


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("change, expected", [
    ("rename", "unexpected key 'layer9.weight'"),
    ("drop", "1 key(s) missing, first 'conv1.weight'"),
    ("reshape", "conv1.weight has shape (4, 3, 3, 4)"),
    ("swap", "unexpected key"),
])
def test_a_mismatched_checkpoint_is_refused_with_one_line(tiny_files, tmp_path, change, expected):
    model, folder = tiny_files
    state = torch.load(folder / up.ENCODER_FILE, weights_only=True)
    if change == "rename":
        state["layer9.weight"] = state.pop("conv1.weight")
    elif change == "drop":
        del state["conv1.weight"]
    elif change == "reshape":
        state["conv1.weight"] = torch.zeros(4, 3, 3, 4)
    else:
        state = torch.load(folder / up.DECODER_FILE, weights_only=True)   # decoder weights as the encoder
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save(state, bad / up.ENCODER_FILE)
    (bad / up.DECODER_FILE).write_bytes((folder / up.DECODER_FILE).read_bytes())
    with pytest.raises(EvalError) as excinfo:
        up.load_upernet101(bad, **TINY)
    assert expected in one_line(excinfo) and up.ENCODER_FILE in str(excinfo.value)


class RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))   # what a malicious checkpoint would do, harmlessly


def test_a_file_with_pickled_code_is_refused_without_running_it(tiny_files, tmp_path):
    _, folder = tiny_files
    marker = tmp_path / "code-ran"
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({"conv1.weight": RunsCodeWhenUnpickled(marker)}, bad / up.ENCODER_FILE)
    with pytest.raises(EvalError) as excinfo:
        up.load_upernet101(bad, **TINY)
    assert "not a plain state-dict file" in one_line(excinfo)
    assert not marker.exists()
    with pytest.raises(EvalError, match="is not a folder"):
        up.load_upernet101(folder.parent / "nowhere", **TINY)
    (bad / up.ENCODER_FILE).write_bytes((folder / up.ENCODER_FILE).read_bytes())
    with pytest.raises(EvalError, match=f"{up.DECODER_FILE} does not exist"):
        up.load_upernet101(bad, **TINY)


def test_preprocessing_is_mit_semsegs_test_transform():
    img = Image.new("RGB", (100, 70), (124, 116, 104))
    x = up.preprocess(img, 300)
    # scale = 300/70: width int(428.57) = 428 -> 448, height 300 -> 320 (multiples of 32)
    assert x.shape == (1, 3, 320, 448)
    expected = (torch.tensor([124, 116, 104]) / 255.0 - torch.tensor(up.MEAN)) / torch.tensor(up.STD)
    assert torch.allclose(x[0, :, 5, 5], expected, atol=1e-6)
    assert up.preprocess(Image.new("RGB", (3000, 600)), 600).shape[2:] == (224, 1024)   # long side capped at 1000


def test_eval_segmentation_with_upernet101_scores_all_classes_by_default(tiny_files, tmp_path, monkeypatch, capsys):
    model, folder = tiny_files
    monkeypatch.setattr(up, "load_upernet101", partial(up.load_upernet101, **TINY))
    gen, lab = tmp_path / "gen", tmp_path / "lab"
    gen.mkdir(), lab.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(gen / f"m{i}.png")
        Image.fromarray(rng.integers(0, 4, (48, 64), dtype=np.uint8)).save(lab / f"m{i}.png")
    out = tmp_path / "seg.json"
    argv = ["--generated_dir", str(gen), "--label_dir", str(lab), "--segmenter", "upernet101", "--upernet101_dir",
            str(folder), "--upernet101_scales", "64", "96", "--device", "cpu", "--output", str(out)]
    assert run_main(seg.main, argv) == 0
    result = json.loads(out.read_text())
    assert result["miou_mean"] == "all" and result["model"].startswith("upernet101")
    # the same predictions by hand: softmax averaged over the two scales, argmax, one confusion matrix
    segmenter = up.UperNet101Segmenter(None, "cpu", (64, 96), model=model)
    cm = sum(seg.confusion_matrix(segmenter.predict(Image.open(gen / f"m{i}.png"), (48, 64)),
                                  seg.reduce_zero_label(np.asarray(Image.open(lab / f"m{i}.png"))), 150)
             for i in range(2))
    assert result["miou"] == pytest.approx(seg.scores_from_confusion(cm, "all")["miou"], abs=1e-12)
    assert result["classes"][0]["name"] == "wall"
    # the mean can still be chosen
    assert run_main(seg.main, argv + ["--miou_mean", "present"]) == 0
    assert json.loads(out.read_text())["miou_mean"] == "present"
    capsys.readouterr()
    assert run_main(seg.main, argv[:6]) == 2   # no --upernet101_dir
    assert capsys.readouterr().err.strip().count("\n") == 0
