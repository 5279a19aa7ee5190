"""The diffusion training step of the image trainers, in one place: latents, noise, timesteps, the noisy input,
the training target and the loss (with DreamBooth's prior-preservation split). A trainer gives the denoiser
call (UNet + its conditioning), this does the rest.

    objective = DiffusionObjective(pipe.vae, pipe.scheduler, run.weight_dtype, run.device)
    loss = objective.loss(pixels, lambda noisy, t: unet(noisy, t, emb, return_dict=False)[0], gen,
                          prior_loss_weight=1.0)   # second half of the batch: class images (DreamBooth Eq. 2)
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


class DiffusionObjective:
    """DDPM training of an epsilon- or v-prediction model (DreamBooth Eq. 1; diffusers' train_dreambooth_lora)."""

    def __init__(self, vae, scheduler, weight_dtype: torch.dtype, device: torch.device):
        from diffusers import DDPMScheduler

        self.vae, self.weight_dtype, self.device = vae, weight_dtype, device
        self.scheduler = DDPMScheduler.from_config(scheduler.config)   # the pipeline's own noise schedule

    def noisy_latents(self, pixels: torch.Tensor, gen: torch.Generator):
        """(latents, noise, timesteps, noisy latents). All randomness comes from `gen`, a CPU generator the loop
        seeds per step and micro-batch, in this order (VAE sample, noise, timesteps): the same draws on any
        device and on resume."""
        sched = self.scheduler
        pixels = pixels.to(self.device, dtype=self.vae.dtype)   # the VAE may stay fp32 (SDXL) under mixed precision
        with torch.no_grad():
            latents = self.vae.encode(pixels).latent_dist.sample(generator=gen) * self.vae.config.scaling_factor
        latents = latents.to(self.weight_dtype)
        noise = torch.randn(latents.shape, generator=gen, dtype=torch.float32).to(self.device, latents.dtype)
        timesteps = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=gen)
        timesteps = timesteps.to(self.device)
        return latents, noise, timesteps, sched.add_noise(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the model predicts: the velocity for v-prediction models, else the noise (epsilon)."""
        if self.scheduler.config.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, timesteps).float()
        return noise.float()

    def loss(self, pixels: torch.Tensor, denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
             gen: torch.Generator, prior_loss_weight: float | None = None) -> torch.Tensor:
        """The MSE between the prediction and the target; with `prior_loss_weight`, the batch's second half is the
        class images and the loss is instance MSE + weight × prior MSE (DreamBooth Eq. 2)."""
        latents, noise, timesteps, noisy = self.noisy_latents(pixels, gen)
        pred = denoise(noisy, timesteps).float()
        target = self.target(latents, noise, timesteps)
        if prior_loss_weight is None:
            return F.mse_loss(pred, target)
        (pred, pred_prior), (target, target_prior) = pred.chunk(2), target.chunk(2)
        return F.mse_loss(pred, target) + prior_loss_weight * F.mse_loss(pred_prior, target_prior)
