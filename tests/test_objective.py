"""The shared denoising objective equals diffusers' training script's, written out here by hand.

Reference: diffusers' examples/text_to_image/train_text_to_image_lora.py — noise `randn_like(latents)` plus
`noise_offset * randn((b, c, 1, 1))`, `add_noise`, target `noise` (epsilon) or `get_velocity` (v), and
min-SNR: `mse_loss_weights = stack([snr, gamma]).min(dim=0)[0]`, divided by `snr` (epsilon) or `snr + 1` (v).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from lora_loom.sd15.config_files import config_dir
from lora_loom.sd15.objective import DiffusionObjective, multires_noise


def sd15_scheduler(prediction_type="epsilon"):
    return DDPMScheduler.from_pretrained(config_dir("sd15"), subfolder="scheduler", prediction_type=prediction_type)


def reference_loss(scheduler, prediction, x0, noise, timesteps, gamma):
    alphas_cumprod = scheduler.alphas_cumprod
    sqrt_alpha = alphas_cumprod[timesteps] ** 0.5
    sigma = (1 - alphas_cumprod[timesteps]) ** 0.5
    snr = (sqrt_alpha / sigma) ** 2
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    else:
        target = sqrt_alpha[:, None, None, None] * noise - sigma[:, None, None, None] * x0
    if not gamma:
        return F.mse_loss(prediction, target, reduction="mean")
    weights = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    weights = weights / snr if scheduler.config.prediction_type == "epsilon" else weights / (snr + 1)
    per_sample = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights).mean()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma", [0.0, 5.0])
def test_loss_is_diffusers_training_scripts(prediction_type, gamma):
    scheduler = sd15_scheduler(prediction_type)
    objective = DiffusionObjective(scheduler, min_snr_gamma=gamma)
    g = torch.Generator().manual_seed(0)
    x0, prediction = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    noise, timesteps = objective.noise(x0.shape, g), objective.timesteps(6, g)
    ours = objective.loss(prediction, x0, noise, timesteps)
    torch.testing.assert_close(
        ours, reference_loss(scheduler, prediction, x0, noise, timesteps, gamma), rtol=1e-6, atol=0
    )
    torch.testing.assert_close(objective.noisy(x0, noise, timesteps), scheduler.add_noise(x0, noise, timesteps))


def test_noise_draws_are_seeded_in_a_fixed_order_with_offset_as_diffusers_adds_it():
    objective = DiffusionObjective(sd15_scheduler(), noise_offset=0.1)
    noise = objective.noise((3, 4, 8, 8), torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    expected = torch.randn((3, 4, 8, 8), generator=g)
    expected = expected + 0.1 * torch.randn((3, 4, 1, 1), generator=g)
    assert torch.equal(noise, expected)
    assert torch.equal(DiffusionObjective(sd15_scheduler()).noise((2, 4, 8, 8), torch.Generator().manual_seed(2)),
                       torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(2)))  # fmt: skip


def test_multires_noise_is_seeded_unit_and_mostly_low_frequency_extra():
    base = torch.randn((64, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    a = multires_noise(base, 3, 0.5, torch.Generator().manual_seed(1))
    b = multires_noise(base, 3, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == base.shape
    assert math.isclose(a.std().item(), 1.0, rel_tol=1e-5)
    # The per-image spatial mean (the lowest frequency) varies more than in plain white noise.
    assert a.mean(dim=(2, 3)).std() > 1.5 * base.mean(dim=(2, 3)).std()


def test_min_snr_weight_with_the_x0_weight_floored():
    from diffusers.training_utils import compute_snr

    scheduler = sd15_scheduler()
    timesteps = torch.arange(1000)
    snr = compute_snr(scheduler, timesteps)
    plain = DiffusionObjective(scheduler, min_snr_gamma=5.0).weights(timesteps)
    torch.testing.assert_close(plain, torch.clamp(snr, max=5.0) / snr)  # floor 0 is min-SNR-5
    floored = DiffusionObjective(scheduler, min_snr_gamma=5.0, snr_floor=1.0).weights(timesteps)
    x0_weight = floored * snr  # epsilon MSE = SNR * x0 MSE
    assert x0_weight.min() >= 1.0 - 1e-5 and x0_weight.max() <= 5.0 + 1e-5
    # Where SNR >= 1 nothing changes; at SD1.5's noisiest step the epsilon weight is 1/SNR (~213), not 1.
    torch.testing.assert_close(floored[snr >= 1.0], plain[snr >= 1.0])
    assert plain[-1] == 1.0 and floored[-1] > 200
    assert DiffusionObjective(scheduler).weights(timesteps) is None  # gamma 0: min-SNR off
