"""CSAILVision's UperNet-101 for ADE20K (mit-semseg `ade20k-resnet101-upernet`), the segmenter whose mIoU the
DeLoRA and ETHER papers report, written in plain torch so its official checkpoint loads without mit-semseg:

    python -m eval.segmentation --segmenter upernet101 --upernet101_dir DIR ...

DIR holds the two official files, encoder_epoch_50.pth and decoder_epoch_50.pth: plain state dicts, read
with torch.load(weights_only=True), so no pickled code ever runs. Every key and shape is checked before
anything is copied; a mismatch is one error naming the first offending key.

Architecture (mit_semseg/models/resnet.py + models.py, config/ade20k-resnet101-upernet.yaml):
- encoder `resnet101` (not dilated): ResNet-101 bottlenecks (3, 4, 23, 3) after a deep stem of three 3x3
  convs 3->64 (stride 2) ->64 ->128 + max-pool, so layer1 starts from 128 channels; the four stage outputs
  (256, 512, 1024, 2048 channels at strides 4, 8, 16, 32) feed the decoder. No avg-pool / fc.
- decoder `upernet`: PPM on the last stage (pool scales 1, 2, 3, 6; mit-semseg upsamples the pooled map
  *before* its 1x1 conv), FPN with fpn_dim 512, the four levels fused at stride 4, 3x3 conv + 1x1 to 150 classes.
Module names follow mit-semseg's exactly, so their state dicts are ours. Batch norms are plain BatchNorm2d
(eval mode, running statistics); mit-semseg's SynchronizedBatchNorm adds bookkeeping buffers
(_tmp_running_mean, _tmp_running_var, _running_iter) and torch adds num_batches_tracked: those are accepted
and ignored, as they do not enter an eval-mode forward.

Preprocessing is mit-semseg's test path: RGB / 255, ImageNet mean/std, the image resized (PIL bilinear) so
its short side is s and its long side at most 1000, both rounded up to a multiple of 32; the class
probabilities (softmax of logits upsampled bilinearly to the label map) are averaged over the scales and
argmax'd. mit-semseg's config tests at s = 300, 375, 450, 525, 600; the default here is that full set
(`--upernet101_scales`), and a single scale (e.g. 512) is a cheaper, documented deviation.

Parameter count at the official configuration: 42,623,936 (encoder) + 40,590,486 (decoder) = 83,214,422,
derived by hand from the layer shapes in tests/test_upernet101.py; mit-semseg 1.0.0's own classes built with
these settings give the same counts, the same state-dict keys (plus their BN bookkeeping buffers) and,
with the same weights, the same probabilities to the last bit.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from ground.ade20k import CLASSES

from . import EvalError

ENCODER_FILE, DECODER_FILE = "encoder_epoch_50.pth", "decoder_epoch_50.pth"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TEST_SCALES = (300, 375, 450, 525, 600)   # config/ade20k-resnet101-upernet.yaml imgSizes
MAX_SIZE, PADDING = 1000, 32              # imgMaxSize, padding_constant
# buffers mit-semseg's SynchronizedBatchNorm and torch's BatchNorm save that an eval forward never reads
BN_BOOKKEEPING = ("num_batches_tracked", "_tmp_running_mean", "_tmp_running_var", "_running_iter")


# ----- the architecture (names as in mit-semseg) -------------------------------------------------------
def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


def conv3x3_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(conv3x3(cin, cout), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3x3(planes, planes, stride), nn.BatchNorm2d(planes)   # stride on the 3x3
        self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4)
        self.relu, self.downsample = nn.ReLU(inplace=True), downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResnetEncoder(nn.Module):
    """mit-semseg's `Resnet` wrapper of its deep-stem ResNet: returns the four stage outputs."""

    def __init__(self, layers=(3, 4, 23, 3), width: int = 64):
        super().__init__()
        w = width
        self.conv1, self.bn1, self.relu1 = conv3x3(3, w, stride=2), nn.BatchNorm2d(w), nn.ReLU(inplace=True)
        self.conv2, self.bn2, self.relu2 = conv3x3(w, w), nn.BatchNorm2d(w), nn.ReLU(inplace=True)
        self.conv3, self.bn3, self.relu3 = conv3x3(w, 2 * w), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.inplanes = 2 * w
        self.layer1 = self._make_layer(w, layers[0])
        self.layer2 = self._make_layer(2 * w, layers[1], stride=2)
        self.layer3 = self._make_layer(4 * w, layers[2], stride=2)
        self.layer4 = self._make_layer(8 * w, layers[3], stride=2)
        self.out_channels = tuple(m * w * Bottleneck.expansion for m in (1, 2, 4, 8))

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * 4))
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * 4
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x) -> list[torch.Tensor]:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.maxpool(self.relu3(self.bn3(self.conv3(x))))
        out = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            out.append(x)
        return out


class UPerNetDecoder(nn.Module):
    """mit-semseg's `UPerNet` head (arch 'upernet': fpn_dim 512): logits at stride 4."""

    def __init__(self, num_class: int = 150, fpn_inplanes=(256, 512, 1024, 2048), fpn_dim: int = 512,
                 pool_scales=(1, 2, 3, 6), ppm_dim: int = 512):
        super().__init__()
        fc_dim = fpn_inplanes[-1]
        self.ppm_pooling = nn.ModuleList(nn.AdaptiveAvgPool2d(s) for s in pool_scales)
        self.ppm_conv = nn.ModuleList(nn.Sequential(nn.Conv2d(fc_dim, ppm_dim, 1, bias=False),
                                                    nn.BatchNorm2d(ppm_dim), nn.ReLU(inplace=True))
                                      for _ in pool_scales)
        self.ppm_last_conv = conv3x3_bn_relu(fc_dim + len(pool_scales) * ppm_dim, fpn_dim)
        self.fpn_in = nn.ModuleList(nn.Sequential(nn.Conv2d(c, fpn_dim, 1, bias=False), nn.BatchNorm2d(fpn_dim),
                                                  nn.ReLU(inplace=True)) for c in fpn_inplanes[:-1])
        self.fpn_out = nn.ModuleList(nn.Sequential(conv3x3_bn_relu(fpn_dim, fpn_dim))
                                     for _ in fpn_inplanes[:-1])
        self.conv_last = nn.Sequential(conv3x3_bn_relu(len(fpn_inplanes) * fpn_dim, fpn_dim),
                                       nn.Conv2d(fpn_dim, num_class, 1))

    def forward(self, conv_out: list[torch.Tensor]) -> torch.Tensor:
        conv5 = conv_out[-1]
        size = conv5.shape[2:]
        up = dict(mode="bilinear", align_corners=False)
        ppm = [conv5] + [conv(F.interpolate(pool(conv5), size, **up))   # upsample, then 1x1: mit-semseg's order
                         for pool, conv in zip(self.ppm_pooling, self.ppm_conv)]
        f = self.ppm_last_conv(torch.cat(ppm, 1))
        levels = [f]
        for i in reversed(range(len(conv_out) - 1)):   # top-down: lateral 1x1 + upsampled coarser level
            lateral = self.fpn_in[i](conv_out[i])
            f = lateral + F.interpolate(f, lateral.shape[2:], **up)
            levels.append(self.fpn_out[i](f))
        levels.reverse()                                 # P2 (stride 4) ... P5
        fused = [levels[0]] + [F.interpolate(x, levels[0].shape[2:], **up) for x in levels[1:]]
        return self.conv_last(torch.cat(fused, 1))


class UperNet101(nn.Module):
    """encoder + decoder; forward(pixels, size) -> (N, num_class, *size) logits, bilinear to `size`."""

    def __init__(self, num_class: int = 150, layers=(3, 4, 23, 3), width: int = 64, fpn_dim: int = 512,
                 ppm_dim: int = 512):
        super().__init__()
        self.encoder = ResnetEncoder(layers, width)
        self.decoder = UPerNetDecoder(num_class, self.encoder.out_channels, fpn_dim, ppm_dim=ppm_dim)
        self.num_class = num_class

    def forward(self, pixels: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        logits = self.decoder(self.encoder(pixels))
        size = tuple(size or pixels.shape[2:])
        return F.interpolate(logits, size, mode="bilinear", align_corners=False)


# ----- loading the official files ------------------------------------------------------------------
def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A plain {name: tensor} file; weights_only=True refuses anything that would run pickled code."""
    if not path.is_file():
        raise EvalError(f"{path} does not exist: --upernet101_dir needs {ENCODER_FILE} and {DECODER_FILE} "
                        f"(mit-semseg's ade20k-resnet101-upernet checkpoint)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # UnpicklingError for code, RuntimeError/EOFError for a damaged file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise EvalError(f"{path} is not a plain state-dict file ({first})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EvalError(f"{path} is not a state dict of tensors (mit-semseg saves net.state_dict())")
    return state


def check_state_dict(module: nn.Module, state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """The tensors `module` needs, after checking every key and shape; EvalError names the first mismatch."""
    expected = module.state_dict()
    wanted = {k: v for k, v in expected.items() if not k.endswith(BN_BOOKKEEPING)}
    for key in sorted(state):
        if key in wanted:
            if tuple(state[key].shape) != tuple(wanted[key].shape):
                raise EvalError(f"{path.name}: {key} has shape {tuple(state[key].shape)}, UperNet-101 expects "
                                f"{tuple(wanted[key].shape)}: not the ade20k-resnet101-upernet checkpoint")
        elif not (key.endswith(BN_BOOKKEEPING) and key.rsplit(".", 1)[0] + ".running_mean" in expected):
            raise EvalError(f"{path.name}: unexpected key {key!r}: not the ade20k-resnet101-upernet checkpoint "
                            f"(check that encoder and decoder files are not swapped)")
    missing = sorted(wanted.keys() - state.keys())
    if missing:
        raise EvalError(f"{path.name}: {len(missing)} key(s) missing, first {missing[0]!r}: not the "
                        f"ade20k-resnet101-upernet checkpoint")
    return {k: state[k] for k in wanted}


def load_upernet101(folder, **arch) -> UperNet101:
    """UperNet101(**arch) with the official encoder/decoder files of `folder`, in eval mode."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise EvalError(f"--upernet101_dir {folder} is not a folder (it should hold {ENCODER_FILE} and "
                        f"{DECODER_FILE})")
    model = UperNet101(**arch)
    for part, name in ((model.encoder, ENCODER_FILE), (model.decoder, DECODER_FILE)):
        path = folder / name
        part.load_state_dict(check_state_dict(part, read_state_dict(path), path), strict=False)
    return model.eval()


# ----- the segmenter -----------------------------------------------------------------------------
def round_up(x: int, p: int) -> int:
    return ((x - 1) // p + 1) * p


def preprocess(image, short_side: int) -> torch.Tensor:
    """(1, 3, h, w) as mit-semseg's ValDataset: short side -> short_side (long side <= 1000), both
    rounded up to a multiple of 32, PIL bilinear, /255, ImageNet mean/std."""
    image = image.convert("RGB")
    w, h = image.size
    scale = min(short_side / min(h, w), MAX_SIZE / max(h, w))
    tw, th = round_up(int(w * scale), PADDING), round_up(int(h * scale), PADDING)
    x = torch.from_numpy(np.asarray(image.resize((tw, th), Image.BILINEAR), dtype=np.float32) / 255.0)
    x = (x.permute(2, 0, 1) - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    return x[None]


class UperNet101Segmenter:
    """eval.segmentation's segmenter protocol (name, num_classes, id2label, predict) for UperNet-101."""

    def __init__(self, folder, device="cpu", scales=TEST_SCALES, model: UperNet101 | None = None):
        if not scales or any(int(s) <= 0 for s in scales):
            raise EvalError(f"--upernet101_scales must be positive short-side sizes, got {scales}")
        self.device, self.scales = torch.device(device), tuple(int(s) for s in scales)
        self.model = (model or load_upernet101(folder)).to(self.device).eval()
        self.num_classes = self.model.num_class
        self.name = f"upernet101 (mit-semseg ade20k-resnet101-upernet; scales {','.join(map(str, self.scales))})"
        self.id2label = dict(enumerate(CLASSES)) if self.num_classes == len(CLASSES) else {}

    @torch.inference_mode()
    def predict(self, image, size: tuple[int, int]) -> np.ndarray:
        """(H, W) = size class ids: softmax at label resolution, averaged over the scales, argmax."""
        probs = torch.zeros(1, self.num_classes, *size, device=self.device)
        for s in self.scales:
            logits = self.model(preprocess(image, s).to(self.device), size)
            probs += F.softmax(logits.float(), dim=1) / len(self.scales)
        return probs.argmax(1)[0].cpu().numpy()
