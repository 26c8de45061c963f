"""The Sampler's pixels equal diffusers' own pipeline, built here without any of our helpers.

Independent of us: the ComfyUI name → diffusers scheduler table below is written by hand from diffusers'
documentation of the A1111 / k-diffusion equivalents (https://huggingface.co/docs/diffusers/api/schedulers/overview:
"DPM++ 2M → DPMSolverMultistepScheduler", "… Karras → init with use_karras_sigmas=True", "Euler a →
EulerAncestralDiscreteScheduler", …); the scheduler config is SD1.5's published one, swapped in the way
diffusers' docs do it (`Cls.from_config(pipe.scheduler.config)`); the pipeline, U-Net, VAE and text encoder
come from `StableDiffusionPipeline.from_single_file` of the built-in toy-world checkpoint (a trained model, so
different samplers really draw different pictures; a random tiny model's near-grey output hides that).
Only the tokenizer is ours (there is no other offline
source); its ids are checked against SD1.5's reference ids in test_tokenizer.py.
"""

import itertools
import logging

import diffusers
import numpy as np
import pytest
import torch

from lora_loom.nodes import impl
from lora_loom.sd15.builtin import BUILT_IN_TOY, TOY_WORLD_CHECKPOINT
from lora_loom.sd15.config_files import config_dir
from lora_loom.sd15.sampling import SAMPLERS, SCHEDULES
from lora_loom.sd15.tokenizer import load_clip_tokenizer

# ComfyUI (sampler_name, scheduler) → (diffusers class, options); by hand, see the module docstring.
DIFFUSERS_EQUIVALENT = {
    ("euler", "normal"): ("EulerDiscreteScheduler", {}),
    ("euler", "karras"): ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    ("euler_ancestral", "normal"): ("EulerAncestralDiscreteScheduler", {}),
    ("heun", "normal"): ("HeunDiscreteScheduler", {}),
    ("heun", "karras"): ("HeunDiscreteScheduler", {"use_karras_sigmas": True}),
    ("ddim", "normal"): ("DDIMScheduler", {}),
    ("dpmpp_2m", "normal"): ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    ("dpmpp_2m", "karras"): (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    ("lms", "normal"): ("LMSDiscreteScheduler", {}),
    ("lms", "karras"): ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
}
# SD1.5's scheduler_config.json as published with the model.
SD15_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "trained_betas": None,
}
SETTINGS = {"steps": 4, "cfg": 2.0, "width": 64, "height": 64, "batch_size": 2}
PROMPT, NEGATIVE, SEED = "a large red circle in the top left on a blue background", "green", 7


def test_the_table_covers_every_sampler_and_schedule_we_offer():
    assert {name for name, _ in DIFFUSERS_EQUIVALENT} == set(SAMPLERS)
    assert {schedule for _, schedule in DIFFUSERS_EQUIVALENT} == set(SCHEDULES)


@pytest.fixture(scope="module")
def reference_pipe():
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    pipe = diffusers.StableDiffusionPipeline.from_single_file(
        str(TOY_WORLD_CHECKPOINT),
        config=str(config_dir("toy-world-sd15")),
        local_files_only=True,
        torch_dtype=torch.float32,  # LoadBase's "auto" on the CPU
        tokenizer=load_clip_tokenizer(),
        scheduler=diffusers.PNDMScheduler.from_config(SD15_SCHEDULER),  # as the published pipeline loads it
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """Our Sampler's images for every (sampler, schedule) in the table, from one LoadBase."""
    base = impl.load_base(BUILT_IN_TOY)[0]
    images = {}
    for sampler_name, schedule in DIFFUSERS_EQUIVALENT:
        settings = {**SETTINGS, "sampler_name": sampler_name, "scheduler": schedule}
        images[sampler_name, schedule] = impl.sampler(base, PROMPT, NEGATIVE, SEED, **settings)[0].numpy()
    return images


@pytest.mark.parametrize("names", list(DIFFUSERS_EQUIVALENT), ids=lambda names: "-".join(names))
def test_pixels_equal_diffusers_with_the_documented_scheduler(reference_pipe, ours, names):
    class_name, options = DIFFUSERS_EQUIVALENT[names]
    base_config = reference_pipe.scheduler.config  # PNDM's, as loaded; each test swaps from it afresh
    scheduler = getattr(diffusers, class_name).from_config(base_config, **options)
    pipe = diffusers.StableDiffusionPipeline(**{**reference_pipe.components, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=SETTINGS["steps"],
        guidance_scale=SETTINGS["cfg"],
        width=SETTINGS["width"],
        height=SETTINGS["height"],
        num_images_per_prompt=SETTINGS["batch_size"],
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="np",
    ).images
    # 1e-3 covers float32 summation-order noise; the closest two *different* settings differ by far more
    # (test_every_setting_draws_something_else asserts > 50× this; measured: the closest pair differs by 0.14).
    assert np.abs(ours[names] - reference).max() <= 1e-3


def test_every_setting_draws_something_else(ours):
    """A collapsed mapping (every name → euler, karras ignored) would make two of these equal."""
    for (a, image_a), (b, image_b) in itertools.combinations(ours.items(), 2):
        assert np.abs(image_a - image_b).max() > 5e-2, (a, b)


@pytest.mark.parametrize("sampler_name", ["ddim", "euler_ancestral"])
def test_karras_is_refused_where_diffusers_has_no_karras_sigmas(sampler_name):
    base = impl.load_base(BUILT_IN_TOY)[0]
    with pytest.raises(ValueError, match=f"karras schedule is not available with {sampler_name}"):
        impl.sampler(base, PROMPT, NEGATIVE, SEED, **{**SETTINGS, "sampler_name": sampler_name, "scheduler": "karras"})
