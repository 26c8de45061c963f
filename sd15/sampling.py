"""Text-to-image on an SD_BASE handle with diffusers' own pipeline and schedulers.

We run `StableDiffusionPipeline` on the handle's shared modules (brought to the handle's patch set
first), so for the same components and settings the pixels are diffusers' pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # keep this module light: the node contract imports the names below
    from .base import SDBase
    from .models import SD15Components

SAMPLERS = ("euler", "euler_ancestral", "heun", "ddim", "dpmpp_2m", "lms")
SCHEDULES = ("normal", "karras")

ProgressCallback = Callable[[int, int], None]  # (steps done, total); may raise to interrupt


@dataclass
class SampleResult:
    images: torch.Tensor  # [B, H, W, 3] float32 in 0..1, on the CPU (ComfyUI's IMAGE)
    # [B, 4, H/8, W/8] float32 on the CPU, in the VAE's own scale (not × scaling_factor): ComfyUI's
    # LATENT["samples"], which its VAEDecode decodes as is.
    latents: torch.Tensor


def make_scheduler(sampler_name: str, schedule: str, config: dict):
    """The diffusers scheduler for ComfyUI-style (sampler_name, scheduler) names."""
    import diffusers

    classes = {
        "euler": diffusers.EulerDiscreteScheduler,
        "euler_ancestral": diffusers.EulerAncestralDiscreteScheduler,
        "heun": diffusers.HeunDiscreteScheduler,
        "ddim": diffusers.DDIMScheduler,
        "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
        "lms": diffusers.LMSDiscreteScheduler,
    }
    if sampler_name not in classes:
        raise ValueError(f"sampler_name must be one of {', '.join(SAMPLERS)}, not {sampler_name!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"scheduler must be one of {', '.join(SCHEDULES)}, not {schedule!r}")
    options = {}
    if sampler_name == "dpmpp_2m":
        options.update(algorithm_type="dpmsolver++", solver_order=2)
    if schedule == "karras":
        if sampler_name in ("ddim", "euler_ancestral"):
            raise ValueError(f"the karras schedule is not available with {sampler_name} in diffusers; use normal")
        options["use_karras_sigmas"] = True
    return classes[sampler_name].from_config(config, **options)


def diffusers_pipeline(components: SD15Components, tokenizer=None, scheduler=None):
    """A diffusers StableDiffusionPipeline over these modules (no copies, no safety checker)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=tokenizer,
        unet=components.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_for(base: SDBase, scheduler):
    """The pipeline over a handle's shared modules, with the real SD1.5 tokenizer."""
    from .tokenizer import load_clip_tokenizer

    model = base.model
    return diffusers_pipeline(model.components, load_clip_tokenizer(model.tokenizer_source), scheduler)


def sample(
    base: SDBase,
    prompt: str,
    negative_prompt: str = "",
    *,
    seed: int = 0,
    steps: int = 20,
    cfg: float = 7.0,
    sampler_name: str = "euler",
    scheduler: str = "normal",
    width: int = 512,
    height: int = 512,
    batch_size: int = 1,
    progress: ProgressCallback | None = None,
) -> SampleResult:
    """Sample images; the same inputs give the same pixels (noise drawn on the CPU from `seed`)."""
    return _run(
        base,
        prompt,
        negative_prompt,
        torch.Generator("cpu").manual_seed(int(seed) % 2**64),
        batch_size,
        steps=steps,
        cfg=cfg,
        sampler_name=sampler_name,
        scheduler=scheduler,
        width=width,
        height=height,
        progress=progress,
    )


def sample_pairs(
    base: SDBase,
    prompts: list[str],
    seeds: list[int],
    negative_prompt: str = "",
    *,
    steps: int = 20,
    cfg: float = 7.0,
    sampler_name: str = "euler",
    scheduler: str = "normal",
    width: int = 512,
    height: int = 512,
    progress: ProgressCallback | None = None,
) -> SampleResult:
    """One image per (prompt, seed) pair, in one batch; image i equals ``sample(base, prompts[i],
    seed=seeds[i])`` (each pair has its own noise generator)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    generators = [torch.Generator("cpu").manual_seed(int(seed) % 2**64) for seed in seeds]
    return _run(
        base,
        list(prompts),
        [negative_prompt] * len(prompts) if negative_prompt else None,
        generators,
        1,
        steps=steps,
        cfg=cfg,
        sampler_name=sampler_name,
        scheduler=scheduler,
        width=width,
        height=height,
        progress=progress,
    )


def _run(
    base,
    prompt,
    negative_prompt,
    generator,
    images_per_prompt,
    *,
    steps,
    cfg,
    sampler_name,
    scheduler,
    width,
    height,
    progress,
) -> SampleResult:
    if width % 8 or height % 8:
        raise ValueError(f"width and height must be multiples of 8, got {width}×{height}")
    model = base.model
    with model.lock, torch.no_grad():
        base.activate()
        pipe = pipeline_for(base, make_scheduler(sampler_name, scheduler, model.scheduler_config))

        def on_step_end(_pipe, step, _timestep, callback_kwargs):
            if progress is not None:
                progress(step + 1, steps)
            return callback_kwargs

        latents = pipe(
            prompt=prompt,
            negative_prompt=negative_prompt or None,
            num_inference_steps=steps,
            guidance_scale=cfg,
            width=width,
            height=height,
            num_images_per_prompt=images_per_prompt,
            generator=generator,
            output_type="latent",
            callback_on_step_end=on_step_end,
        ).images
        vae = model.components.vae
        unscaled = latents.to(vae.dtype) / vae.config.scaling_factor
        decoded = vae.decode(unscaled).sample
        images = (decoded.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().contiguous()
    return SampleResult(images=images, latents=unscaled.float().cpu())
