"""The shipped toy-world base: file layout, identical loading through LoadBase and diffusers, adherence."""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm, load_single_file_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextModel

from lora_loom.nodes import impl
from lora_loom.sd15.builtin import BUILT_IN_TOY, TOY_WORLD_CHECKPOINT
from lora_loom.sd15.config_files import config_dir
from lora_loom.sd15.keys import checkpoint_key, vae_key_needs_reshape
from lora_loom.sd15.sampling import sample, sample_pairs
from lora_loom.toyworld import analyse
from lora_loom.toyworld.evaluate import prompt_set, rates_of, sample_images, vae_round_trip

from util import assert_bitwise_equal, make_lora, state_of

REFERENCE_KEYS = Path(__file__).parent / "data" / "sd15_checkpoint_keys.json"
GOALS = {"background": 0.95, "colour": 0.95, "shape": 0.90, "position": 0.95, "size": 0.85}  # issue 16
PROMPT_SEED = 777  # a scene seed used by neither training (0) nor the benchmark (12345)


@pytest.fixture(scope="module")
def toy():
    return impl.load_base(BUILT_IN_TOY, "fp32")[0]


@pytest.fixture(scope="module")
def file_tensors():
    return load_file(TOY_WORLD_CHECKPOINT)


def assert_module_equals_file(component: str, module: torch.nn.Module, file_tensors: dict) -> None:
    state_dict = module.state_dict()
    assert state_dict, component
    for name, tensor in state_dict.items():
        if name.endswith("position_ids"):
            continue
        stored = file_tensors[checkpoint_key(component, name)]
        if component == "vae" and vae_key_needs_reshape(name):
            stored = stored.reshape(tensor.shape)
        assert torch.equal(tensor.cpu(), stored.to(tensor.dtype)), f"{component}: {name}"


def test_shipped_file_is_a_small_sd15_layout_checkpoint(file_tensors):
    assert TOY_WORLD_CHECKPOINT.stat().st_size <= 25_000_000
    reference = json.loads(REFERENCE_KEYS.read_text())["tensors"]
    assert set(file_tensors) == set(reference)  # every key name of a real SD1.5 checkpoint, nothing else
    for key, tensor in file_tensors.items():
        assert tensor.dtype == torch.float16, key
        assert len(tensor.shape) == len(reference[key]), key
        assert torch.isfinite(tensor).all(), key
    with safe_open(str(TOY_WORLD_CHECKPOINT), framework="pt") as f:
        recipe = json.loads(f.metadata()["lora_loom.recipe"])
    assert recipe["image_size"] == 64


def test_load_base_reads_the_file_weights_exactly(toy, file_tensors):
    assert toy.model.dtype == torch.float32
    for component, module in toy.model.components.items():
        assert_module_equals_file(component, module, file_tensors)


def test_diffusers_from_single_file_reads_the_same_weights(toy, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, config = str(TOY_WORLD_CHECKPOINT), str(config_dir("toy-world-sd15"))
    options = {"config": config, "local_files_only": True, "torch_dtype": torch.float32}
    unet = UNet2DConditionModel.from_single_file(path, subfolder="unet", **options)
    vae = AutoencoderKL.from_single_file(path, subfolder="vae", **options)
    checkpoint = load_single_file_checkpoint(path, local_files_only=True)
    text_encoder = create_diffusers_clip_model_from_ldm(
        CLIPTextModel, checkpoint, subfolder="text_encoder", config=config, local_files_only=True
    )
    ours = toy.model.components
    for theirs, mine in ((unet, ours.unet), (vae, ours.vae), (text_encoder.float(), ours.text_encoder)):
        expected = mine.state_dict()
        actual = theirs.state_dict()
        assert list(actual) == list(expected)
        for name, tensor in expected.items():
            assert torch.equal(actual[name].cpu(), tensor.cpu()), name
    # The config folder matches the file: same widths, same latent scale convention as SD1.5.
    assert vae.config.scaling_factor == ours.vae.config.scaling_factor == 0.18215


WORKFLOW_CFG = 2.0  # the shipped workflows' CFG on the toy base


SAMPLERS = ("euler", "dpmpp_2m", "ddim")
CFGS = (1.0, WORKFLOW_CFG, 7.0)
PAIRS = 48
# The docs' figures come from 200 pairs (bench/bench_toyworld.py); this fixed 48-pair subset is held to the
# goals less CFG2_TOLERANCE at CFG 2 (where issue 16 sets them; 48 pairs are not 200: measured euler colour 93.8 %
# here, 97.5 % over 200), less SUBSET_TOLERANCE at CFG 1 and less CFG7_TOLERANCE at CFG 7. Chance is 1/6
# (colours, backgrounds, places), 1/5 (shapes) and 1/2 (sizes): a base or sampler that ignores the prompt
# fails every one of these by far.
SUBSET_TOLERANCE = 0.10
CFG2_TOLERANCE = 0.05
# At CFG 7 the base misses issue 16's colour and shape goals (200 pairs: colour 87-91 %, shape 72.5-76.5 %;
# docs/toy-world.md): held to a floor far above chance, not to the goal, until a base meets it.
CFG7_TOLERANCE = 0.25


@pytest.fixture(scope="module")
def adherence(toy):
    """{(sampler, cfg): Rates} on 48 fixed (prompt, seed) pairs, 20 steps, scored as the benchmark scores."""
    pairs = prompt_set(PAIRS, seed=PROMPT_SEED)
    return {
        (sampler_name, cfg): rates_of(sample_images(toy, pairs, sampler=sampler_name, cfg=cfg, steps=20), pairs)
        for sampler_name, cfg in itertools.product(SAMPLERS, CFGS)
    }


@pytest.mark.parametrize("sampler_name", SAMPLERS)
@pytest.mark.parametrize("cfg", CFGS, ids=lambda cfg: f"cfg{cfg:g}")
def test_toy_base_reaches_its_adherence_goals(adherence, sampler_name, cfg):
    rates = adherence[sampler_name, cfg]
    tolerance = {1.0: SUBSET_TOLERANCE, WORKFLOW_CFG: CFG2_TOLERANCE, 7.0: CFG7_TOLERANCE}[cfg]
    missed = {name: rates[name] for name in GOALS if rates[name] < GOALS[name] - tolerance}
    assert not missed, (sampler_name, cfg, rates.summary())


def test_much_guidance_over_guides_the_shape(adherence):
    """CFG 7 over-guides this small model: shape falls well below CFG 2's for every sampler (200 pairs, euler /
    dpmpp_2m / ddim: 94.5 / 94 / 92.5 % at CFG 2 against 72.5 / 72.5 / 76.5 % at 7; asserted: 8 points)."""
    for sampler_name in SAMPLERS:
        gap = adherence[sampler_name, WORKFLOW_CFG]["shape"] - adherence[sampler_name, 7.0]["shape"]
        assert gap >= 0.08, (
            sampler_name,
            adherence[sampler_name, WORKFLOW_CFG].summary(),
            adherence[sampler_name, 7.0].summary(),
        )


# The VAE's ceiling on a fixed set of 48 ground-truth scenes per split (issue 16: a VAE that can draw what the
# U-Net never saw, so that a LoRA can teach it). The first shipped VAE kept cyan 0 % and the star 3 % of the
# time here. Measured on this set for the new one (its float32 weights, before the float16 export): every
# attribute 100 % on base scenes; held-out scenes shape 97.9 % and the rest 100 %, star 96.4 %, cyan 100 % (the
# 200-scene figures in docs/toy-world.md are lower for the star: 89.7 %).
ROUND_TRIP_FLOOR = {"base": 0.95, "held_out": 0.90}
HELD_OUT_FLOOR = {"star": 0.85, "cyan": 0.95}


@pytest.mark.parametrize("split", ["base", "held_out"])
def test_the_vae_round_trips_seen_and_held_out_concepts(toy, split):
    rates, concepts = vae_round_trip(toy.model.components.vae, split, n=PAIRS, seed=PROMPT_SEED)
    missed = {name: rates[name] for name in rates.rates if rates[name] < ROUND_TRIP_FLOOR[split]}
    assert not missed, (split, rates.summary())
    if split == "held_out":
        assert set(concepts) == set(HELD_OUT_FLOOR)
        assert all(concepts[name] >= floor for name, floor in HELD_OUT_FLOOR.items()), concepts


def test_position_follows_the_prompt_not_the_starting_noise(toy):
    # The first shipped base put the object wherever the seed's noise suggested: with the same seed, every
    # position phrase gave the same picture. Here each seed is asked for all six places.
    places = [(column, row) for row in ("top", "bottom") for column in ("left", "centre", "right")]
    prompts, seeds, wanted = [], [], []
    for seed in range(4):
        for column, row in places:
            prompts.append(f"a large red square at the {row} {column}, blue background")
            seeds.append(seed)
            wanted.append((column, row))
    images = sample_pairs(toy, prompts, seeds, steps=20, cfg=WORKFLOW_CFG, width=64, height=64)
    pixels = (images.images.numpy() * 255).round().astype(np.uint8)
    placed = [analyse(image).position for image in pixels]
    assert np.mean([got == asked for got, asked in zip(placed, wanted, strict=True)]) >= 0.8, placed


def test_sample_pairs_equals_one_sampler_call_per_pair(toy):
    prompts = ["a red circle on the left, blue background", "green square, top right, on white"]
    batch = sample_pairs(toy, prompts, [5, 9], steps=6, cfg=7.0, width=64, height=64).images
    for image, prompt, seed in zip(batch, prompts, (5, 9), strict=True):
        alone = sample(toy, prompt, seed=seed, steps=6, cfg=7.0, width=64, height=64).images[0]
        torch.testing.assert_close(image, alone, atol=2e-4, rtol=0)


def test_auto_dtype_is_float32_on_the_cpu_for_the_half_precision_file():
    base = impl.load_base(BUILT_IN_TOY, "auto")[0]
    expected = torch.float32 if base.model.device.type == "cpu" else torch.float16
    assert base.model.dtype == expected


def test_loras_on_the_toy_base_restore_exactly_from_the_half_precision_file():
    base = impl.load_base(BUILT_IN_TOY, "fp32")[0]
    components = base.model.components
    original = state_of(components)
    lora = make_lora(components, seed=4)
    stats = base.with_lora(lora, 0.8, 0.5).activate()
    assert stats.weights_written > 0
    assert base.model.engine.restore_overhead_bytes == 0  # W0 re-read from the shipped file, no copies
    base.activate()
    assert_bitwise_equal(components, original)
