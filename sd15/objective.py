"""The denoising objective SD1.5 is trained with, shared by TrainLoRA and the toy-world base's trainer.

As diffusers' `train_text_to_image(_lora).py` does it: Gaussian noise (plus optional offset noise and
kohya's multi-resolution noise), uniform timesteps over the scheduler's training steps, the scheduler's
`add_noise`, the target its `prediction_type` names (ε, or v = αₜ·ε − σₜ·x₀), and a per-sample MSE with
optional min-SNR-γ weighting (Hang et al. 2023; ε: min(SNR, γ)/SNR, v: min(SNR, γ)/(SNR + 1)). Every random
draw comes from the caller's CPU generator, in a fixed order, so a run is reproducible on any device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class DiffusionObjective:
    scheduler: Any  # a diffusers DDPMScheduler (SD1.5: scaled_linear 0.00085–0.012, 1000 steps)
    min_snr_gamma: float = 0.0  # 0: off (every sample weighs 1)
    snr_floor: float = 0.0  # lower clamp of the min-SNR weight's SNR (x0-space floor); 0: plain min-SNR
    noise_offset: float = 0.0  # diffusers' --noise_offset: a per-channel constant added to the noise
    multires_iterations: int = 0  # kohya's --multires_noise_iterations (0: off)
    multires_discount: float = 0.5

    @classmethod
    def for_config(cls, config_name: str, **settings: Any) -> DiffusionObjective:
        """The objective on the noise schedule of a shipped config ("sd15", "toy-world-sd15", ...)."""
        from diffusers import DDPMScheduler

        from .config_files import config_dir

        return cls(DDPMScheduler.from_pretrained(config_dir(config_name), subfolder="scheduler"), **settings)

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    def noise(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """ε for a batch of latents (on the CPU): Gaussian, then the offset, then multi-resolution noise."""
        noise = torch.randn(shape, generator=generator)
        if self.noise_offset:
            # SD1.5's schedule leaves ~8 % of the signal at its last steps; a picture's mean colour leaks
            # through it unless the noise can shift whole channels too.
            noise = noise + self.noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
        if self.multires_iterations:
            noise = multires_noise(noise, self.multires_iterations, self.multires_discount, generator)
        return noise

    def timesteps(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(self.scheduler.config.num_train_timesteps, (batch,), generator=generator)

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(x0, noise, timesteps)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(x0, noise, timesteps)
        raise ValueError(f"unsupported prediction_type {self.prediction_type!r} (epsilon or v_prediction)")

    def weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Per-sample loss weights, or None when min-SNR weighting is off."""
        if not self.min_snr_gamma:
            return None
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.scheduler, timesteps)
        clamped = torch.clamp(snr, min=self.snr_floor, max=self.min_snr_gamma)
        return clamped / (snr + 1) if self.prediction_type == "v_prediction" else clamped / snr

    def loss(
        self, prediction: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """Mean over the batch of each sample's (weighted) MSE against the target, computed in float32."""
        target = self.target(x0, noise, timesteps)
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        weights = self.weights(timesteps)
        return (weights * per_sample).mean() if weights is not None else per_sample.mean()


def multires_noise(noise: torch.Tensor, iterations: int, discount: float, generator: torch.Generator) -> torch.Tensor:
    """kohya sd-scripts' multi-resolution ("pyramid") noise: extra noise at 1/2, 1/4, ... resolution, so
    low-frequency structure cannot be read off the barely-noised signal SD1.5's schedule leaves at its last
    steps. Deterministic given `generator`; normalised to unit std."""
    b, c, h, w = noise.shape
    for i in range(1, iterations + 1):
        hn, wn = max(1, h // 2**i), max(1, w // 2**i)
        low = torch.randn((b, c, hn, wn), generator=generator)
        noise = noise + F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False) * discount**i
        if hn == 1 or wn == 1:
            break
    return noise / noise.std()
