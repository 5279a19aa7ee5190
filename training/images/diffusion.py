"""The diffusion training step of the image trainers, in one place: latents, noise, timesteps, the noisy input,
the training target and the loss (with DreamBooth's prior-preservation split). A trainer gives the denoiser
call (UNet + its conditioning, through its model family), this does the rest. Two objectives: DDPM's epsilon /
v-prediction (SD 1.x/2.x, SDXL) and rectified flow (the DiT families), each family picks its own.

    objective = DiffusionObjective(pipe.vae, pipe.scheduler, run.weight_dtype, run.device)
    loss = objective.loss(pixels, lambda noisy, t: unet(noisy, t, emb, return_dict=False)[0], gen,
                          prior_loss_weight=1.0)   # second half of the batch: class images (DreamBooth Eq. 2)
    val = objective.validation_loss(denoise, held_out_pixels, seed=0, num_timesteps=4)   # a float, no grad

The validation loss (--validation_loss_images) is the plain MSE between prediction and target, no loss weighting,
at fixed points of the noise schedule: timestep (or σ-grid) index ⌊f·T⌋ for f = (k + ½)/K, k = 0..K−1, spread
evenly so no single t dominates the number. Its latents and noise come from a CPU generator seeded with `seed`
alone, in this order (latents, then per point the noise of every image), never from the training generators or the
global RNG: every checkpoint of every method sees the same noise.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def schedule_fractions(num_timesteps: int) -> list[float]:
    """K evenly spread points of the schedule, as fractions in (0, 1): (k + ½)/K."""
    return [(k + 0.5) / num_timesteps for k in range(num_timesteps)]


class HeldOutLoss:
    """validation_loss for an objective: `latents(pixels, gen)` and `at_point(latents, noise, fraction)` ->
    (noisy latents, timesteps, target) are the objective's own."""

    device: torch.device

    def latents(self, pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def at_point(self, latents: torch.Tensor, noise: torch.Tensor, fraction: float):
        raise NotImplementedError

    @torch.no_grad()
    def validation_loss(self, denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], pixels: torch.Tensor,
                        seed: int, num_timesteps: int) -> float:
        """The mean over `num_timesteps` fixed points of the schedule of the MSE between `denoise`'s prediction
        and the target on `pixels` (the held-out images, one batch), with latents and noise drawn from a
        generator seeded with `seed` alone. The caller puts the model in eval mode."""
        gen = torch.Generator().manual_seed(seed)
        latents = self.latents(pixels, gen)
        losses = []
        for fraction in schedule_fractions(num_timesteps):
            noise = torch.randn(latents.shape, generator=gen, dtype=torch.float32).to(self.device, latents.dtype)
            noisy, timesteps, target = self.at_point(latents, noise, fraction)
            losses.append(F.mse_loss(denoise(noisy, timesteps).float(), target.float()))
        return torch.stack(losses).mean().item()

    def validation_timesteps(self, num_timesteps: int) -> list[float]:
        """The model's timestep at each of the validation loss's points (run.json records them)."""
        z = torch.zeros(1, 1, device=self.device)
        return [float(self.at_point(z, z, f)[1][0]) for f in schedule_fractions(num_timesteps)]


class DiffusionObjective(HeldOutLoss):
    """DDPM training of an epsilon- or v-prediction model (DreamBooth Eq. 1; diffusers' train_dreambooth_lora)."""

    def __init__(self, vae, scheduler, weight_dtype: torch.dtype, device: torch.device, snr_gamma: float | None = None,
                 noise_offset: float = 0.0):
        from diffusers import DDPMScheduler

        self.vae, self.weight_dtype, self.device = vae, weight_dtype, device
        self.scheduler = DDPMScheduler.from_config(scheduler.config)   # the pipeline's own noise schedule
        self.snr_gamma, self.noise_offset = snr_gamma, noise_offset    # --snr_gamma, --noise_offset (None, 0: off)

    def noisy_latents(self, pixels: torch.Tensor, gen: torch.Generator):
        """(latents, noise, timesteps, noisy latents). All randomness comes from `gen`, a CPU generator the loop
        seeds per step and micro-batch, in this order (VAE sample, noise, with --noise_offset the offsets,
        timesteps; diffusers' order): the same draws on any device and on resume. Offset noise (diffusers'
        train_text_to_image.py): noise + offset · N(0, 1) of shape (B, C, 1, 1), one constant per image and channel."""
        sched = self.scheduler
        latents = self.latents(pixels, gen)
        noise = torch.randn(latents.shape, generator=gen, dtype=torch.float32).to(self.device, latents.dtype)
        if self.noise_offset:   # off: no draw, so a run without it keeps its bits
            offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=gen, dtype=torch.float32)
            noise = noise + self.noise_offset * offset.to(self.device, latents.dtype)
        timesteps = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=gen)
        timesteps = timesteps.to(self.device)
        return latents, noise, timesteps, sched.add_noise(latents, noise, timesteps)

    def latents(self, pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """A VAE sample (drawn from `gen`), scaled, in the weight dtype."""
        pixels = pixels.to(self.device, dtype=self.vae.dtype)   # the VAE may stay fp32 (SDXL) under mixed precision
        with torch.no_grad():
            latents = self.vae.encode(pixels).latent_dist.sample(generator=gen) * self.vae.config.scaling_factor
        return latents.to(self.weight_dtype)

    def at_point(self, latents: torch.Tensor, noise: torch.Tensor, fraction: float):
        """Timestep ⌊fraction · T⌋ for every image: (noisy latents, timesteps, target)."""
        t = int(fraction * self.scheduler.config.num_train_timesteps)
        timesteps = torch.full((latents.shape[0],), t, dtype=torch.long, device=self.device)
        return (self.scheduler.add_noise(latents, noise, timesteps), timesteps,
                self.target(latents, noise, timesteps))

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the model predicts: the velocity for v-prediction models, else the noise (epsilon)."""
        if self.scheduler.config.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, timesteps).float()
        return noise.float()

    def loss(self, pixels: torch.Tensor, denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
             gen: torch.Generator, prior_loss_weight: float | None = None) -> torch.Tensor:
        """The MSE between the prediction and the target (min-SNR-weighted with --snr_gamma); with
        `prior_loss_weight`, the batch's second half is the class images and the loss is instance MSE + weight ×
        prior MSE (DreamBooth Eq. 2; the prior MSE unweighted, as diffusers' train_dreambooth_lora_sdxl.py has it)."""
        latents, noise, timesteps, noisy = self.noisy_latents(pixels, gen)
        pred = denoise(noisy, timesteps).float()
        target = self.target(latents, noise, timesteps)
        if prior_loss_weight is None:
            return self.weighted_mse(pred, target, timesteps)
        (pred, pred_prior), (target, target_prior) = pred.chunk(2), target.chunk(2)
        return self.weighted_mse(pred, target, timesteps.chunk(2)[0]) + \
            prior_loss_weight * F.mse_loss(pred_prior, target_prior)

    def snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Min-SNR-γ loss weights (Hang et al. 2023, Sec. 3.4) of each image's timestep, as diffusers'
        train_text_to_image.py computes them: min(SNR(t), γ) / SNR(t) for epsilon-prediction models,
        min(SNR(t), γ) / (SNR(t) + 1) for v-prediction ones, SNR from diffusers.training_utils.compute_snr.
        (train_dreambooth_lora_sdxl.py still has the older v-prediction form min(SNR, γ)/SNR + 1, which diffusers
        issues #5654 and #9451 show over-weights high-noise steps; the fixed form is the one here.)"""
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.scheduler, timesteps)
        weights = torch.stack([snr, self.snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
        if self.scheduler.config.prediction_type == "v_prediction":
            return weights / (snr + 1)
        return weights / snr

    def weighted_mse(self, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The batch's MSE; with --snr_gamma each image's own MSE times its min-SNR weight, then their mean."""
        if self.snr_gamma is None:
            return F.mse_loss(pred, target)
        per_image = F.mse_loss(pred, target, reduction="none").mean(dim=list(range(1, pred.dim())))
        return (per_image * self.snr_weights(timesteps)).mean()


WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "logit_normal", "mode", "cosmap")   # diffusers' --weighting_scheme


class FlowMatchObjective(HeldOutLoss):
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
        latents = self.latents(pixels, gen)
        noise = torch.randn(latents.shape, generator=gen, dtype=torch.float32).to(self.device, latents.dtype)
        u = compute_density_for_timestep_sampling(scheme, latents.shape[0], mean, std, mode_scale, generator=gen)
        indices = (u * self.scheduler.config.num_train_timesteps).long()
        timesteps = self.scheduler.timesteps[indices].to(self.device)
        sigmas = self.scheduler.sigmas[indices].to(self.device, torch.float32)
        sigma = sigmas.view(-1, *[1] * (latents.dim() - 1)).to(latents.dtype)
        return latents, noise, timesteps, sigmas, (1.0 - sigma) * latents + sigma * noise

    def latents(self, pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The family's latents (`encode`), in the weight dtype."""
        with torch.no_grad():
            return self.encode(pixels.to(self.device, dtype=self.vae_dtype), gen).to(self.weight_dtype)

    def at_point(self, latents: torch.Tensor, noise: torch.Tensor, fraction: float):
        """The training grid's entry ⌊fraction · T⌋ (σ falls as the index grows) for every image: (noisy latents,
        timesteps, target noise − x); no loss weighting, so runs with different --weighting_scheme compare."""
        index = int(fraction * self.scheduler.config.num_train_timesteps)
        n = latents.shape[0]
        timesteps = self.scheduler.timesteps[index].repeat(n).to(self.device)
        sigma = self.scheduler.sigmas[index].to(self.device, latents.dtype)
        return (1.0 - sigma) * latents + sigma * noise, timesteps, noise - latents

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
