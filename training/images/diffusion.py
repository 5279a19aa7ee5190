"""The diffusion training step of the image trainers, in one place: latents, noise, timesteps, the noisy input,
the training target and the loss (with DreamBooth's prior-preservation split). A trainer gives the denoiser
call (UNet + its conditioning, through its model family), this does the rest. Two objectives: DDPM's epsilon /
v-prediction (SD 1.x/2.x, SDXL) and rectified flow (the DiT families), each family picks its own.

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


WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "logit_normal", "mode", "cosmap")   # diffusers' --weighting_scheme


class FlowMatchObjective:
    """Rectified-flow training of the DiT families (FLUX.1, FLUX.2-klein), as diffusers'
    train_dreambooth_lora_flux*.py do it: σ from the scheduler's grid at u ~ the weighting scheme's density
    (compute_density_for_timestep_sampling), x_σ = (1 − σ)·x + σ·noise, target noise − x, per-sample MSE weighted
    by compute_loss_weighting_for_sd3 (σ⁻² for sigma_sqrt, 2/(π(1 − 2σ + 2σ²)) for cosmap, else 1).

    `encode(pixels, gen)` gives the family's latents (FLUX.1: VAE sample, minus shift, times scale; FLUX.2: the
    VAE mode, patchified and batch-normalised); the family's denoiser call packs them into tokens and back."""

    def __init__(self, encode: Callable[[torch.Tensor, torch.Generator], torch.Tensor], vae_dtype: torch.dtype,
                 scheduler, weight_dtype: torch.dtype, device: torch.device, weighting_scheme: str = "none",
                 logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.encode, self.vae_dtype, self.weight_dtype, self.device = encode, vae_dtype, weight_dtype, device
        # the pipeline scheduler's training grid of timesteps and sigmas (diffusers' noise_scheduler_copy)
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        self.weighting = (weighting_scheme, logit_mean, logit_std, mode_scale)

    def noisy_latents(self, pixels: torch.Tensor, gen: torch.Generator):
        """(latents, noise, timesteps, sigmas, noisy latents); every draw from `gen` (latents, noise, then u)."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        scheme, mean, std, mode_scale = self.weighting
        with torch.no_grad():
            latents = self.encode(pixels.to(self.device, dtype=self.vae_dtype), gen).to(self.weight_dtype)
        noise = torch.randn(latents.shape, generator=gen, dtype=torch.float32).to(self.device, latents.dtype)
        u = compute_density_for_timestep_sampling(scheme, latents.shape[0], mean, std, mode_scale, generator=gen)
        indices = (u * self.scheduler.config.num_train_timesteps).long()
        timesteps = self.scheduler.timesteps[indices].to(self.device)
        sigmas = self.scheduler.sigmas[indices].to(self.device, torch.float32)
        sigma = sigmas.view(-1, *[1] * (latents.dim() - 1)).to(latents.dtype)
        return latents, noise, timesteps, sigmas, (1.0 - sigma) * latents + sigma * noise

    def loss(self, pixels: torch.Tensor, denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
             gen: torch.Generator, prior_loss_weight: float | None = None) -> torch.Tensor:
        """Weighted flow-matching MSE; with `prior_loss_weight`, instance half + weight × class half."""
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        latents, noise, timesteps, sigmas, noisy = self.noisy_latents(pixels, gen)
        pred = denoise(noisy, timesteps).float()
        target = (noise - latents).float()
        weighting = compute_loss_weighting_for_sd3(self.weighting[0], sigmas).view(-1, *[1] * (pred.dim() - 1))
        per_sample = (weighting * (pred - target) ** 2).reshape(pred.shape[0], -1).mean(dim=1)
        if prior_loss_weight is None:
            return per_sample.mean()
        instance, prior = per_sample.chunk(2)
        return instance.mean() + prior_loss_weight * prior.mean()
