"""The semantic-map trainer's model: ControlNet's hint block (diffusers' ControlNetConditioningEmbedding)
sized to the UNet, its output added once to the output of the UNet's conv_in, and its own safetensors file
beside the adapter. training/semantic_map.py documents the layout and parameter count.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ground import runfolder
from training.common import TrainingError

ENCODER_FILE = runfolder.CONDITIONING_ENCODER
ENCODER_WIDTHS = (16, 32, 96, 256)


def conditioning_encoder(unet, vae_scale_factor: int):
    """ControlNet's hint block sized to this UNet: output width = block_out_channels[0], one stride-2
    stage per halving of the VAE (3 for SD's 8x VAE), last conv zero-initialised (diffusers does that)."""
    from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding

    stages = int(round(math.log2(vae_scale_factor)))
    return ControlNetConditioningEmbedding(conditioning_embedding_channels=unet.config.block_out_channels[0],
                                           conditioning_channels=3, block_out_channels=ENCODER_WIDTHS[:stages + 1])


class ConditionedUNet(torch.nn.Module):
    """The UNet plus what turns a control image into its input: the trained encoder (added to conv_in's
    output) or a frozen pretrained ControlNet (down/mid residuals). Set the control image with
    `conditioned(control)`; the hooks make any caller of `unet` (the sampling pipeline too) follow it.
    A batch that is a multiple of the control batch (classifier-free guidance doubles it) repeats it."""

    def __init__(self, unet, encoder=None, controlnet=None):
        super().__init__()
        self.unet, self.conditioning_embedding, self.controlnet = unet, encoder, controlnet
        self._control = None
        if encoder is not None:
            unet.conv_in.register_forward_hook(self._add_embedding)
        if controlnet is not None:
            unet.register_forward_pre_hook(self._controlnet_residuals, with_kwargs=True)

    @contextlib.contextmanager
    def conditioned(self, control: torch.Tensor):
        self._control = control
        try:
            yield self
        finally:
            self._control = None

    def _repeat(self, control: torch.Tensor, batch: int) -> torch.Tensor:
        return control if control.shape[0] == batch else control.repeat(batch // control.shape[0], 1, 1, 1)

    def _add_embedding(self, module, inputs, output):
        if self._control is None:
            return output
        emb = self.conditioning_embedding(self._control.to(self.conditioning_embedding.conv_in.weight.dtype))
        return output + self._repeat(emb, output.shape[0]).to(output.dtype)

    def _controlnet_residuals(self, module, args, kwargs):
        if self._control is None:
            return args, kwargs
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        hidden = args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]
        control = self._repeat(self._control, sample.shape[0]).to(sample.device, self.controlnet.dtype)
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states=hidden, controlnet_cond=control,
                                    return_dict=False)
        return args, {**kwargs, "down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    def forward(self, sample, timestep, encoder_hidden_states, control):
        with self.conditioned(control):
            return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


def save_encoder(encoder, folder: Path) -> None:
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in encoder.state_dict().items()}
    runfolder.atomic_write(Path(folder) / ENCODER_FILE, lambda p: save_file(
        tensors, str(p), metadata={"format": "pt", "kind": "ControlNetConditioningEmbedding"}))


def load_encoder(encoder, folder: Path) -> None:
    path = Path(folder) / ENCODER_FILE
    if not path.is_file():
        raise TrainingError(f"{folder} has no {ENCODER_FILE}; it was not written by this trainer's encoder")
    try:
        state = load_file(str(path))
        encoder.load_state_dict({k: v.to(encoder.conv_in.weight.dtype) for k, v in state.items()})
    except (RuntimeError, OSError, ValueError) as e:
        raise TrainingError(f"{path} does not fit this model's encoder ({str(e).splitlines()[0][:160]})") from None
