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
from lora_loom.toyworld import analyse, caption, scenes, score

from util import assert_bitwise_equal, make_lora, state_of

REFERENCE_KEYS = Path(__file__).parent / "data" / "sd15_checkpoint_keys.json"
GOALS = {"background": 0.90, "colour": 0.90, "shape": 0.75, "position": 0.80}
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


def fixed_prompt_set(n: int):
    truth = scenes(n, PROMPT_SEED)
    rng = np.random.default_rng(PROMPT_SEED)
    return [caption(scene, rng) for scene in truth], truth


WORKFLOW_CFG = 2.0  # the shipped workflows' CFG on the toy base


SAMPLERS = ("euler", "dpmpp_2m", "ddim")
CFGS = (1.0, WORKFLOW_CFG, 7.0)
PAIRS = 48
# The docs' figures come from 200 pairs (bench/bench_toyworld.py); this fixed 48-pair subset is held to the
# goals at the workflows' CFG 2 (its closest margin there: shape 42/48 vs the 36 the goal needs) and to the
# goals less 10 points at CFG 1 and 7, where the 200-pair rates sit near a goal (shape at CFG 7: 74.5-75.5 %).
# Chance is 1/6 (colours, backgrounds, places) and 1/5 (shapes): a base or sampler that ignores the prompt
# fails every one of these by far.
SUBSET_TOLERANCE = 0.10


@pytest.fixture(scope="module")
def adherence(toy):
    """{(sampler, cfg): per-attribute hit counts and "all four"} on 48 fixed (prompt, seed) pairs, 20 steps."""
    prompts, truth = fixed_prompt_set(PAIRS)
    counts = {}
    for sampler_name, cfg in itertools.product(SAMPLERS, CFGS):
        images = sample_pairs(
            toy, prompts, list(range(PAIRS)), steps=20, cfg=cfg, sampler_name=sampler_name, width=64, height=64
        )
        pixels = (images.images.numpy() * 255).round().astype(np.uint8)
        verdicts = [score(image, scene) for image, scene in zip(pixels, truth, strict=True)]
        hits = {name: sum(v[name] for v in verdicts) for name in GOALS}
        hits["all four"] = sum(all(v[name] for name in GOALS) for v in verdicts)
        counts[sampler_name, cfg] = hits
    return counts


@pytest.mark.parametrize("sampler_name", SAMPLERS)
@pytest.mark.parametrize("cfg", CFGS, ids=lambda cfg: f"cfg{cfg:g}")
def test_toy_base_reaches_its_adherence_goals(adherence, sampler_name, cfg):
    rates = {name: adherence[sampler_name, cfg][name] / PAIRS for name in GOALS}
    tolerance = 0.0 if cfg == WORKFLOW_CFG else SUBSET_TOLERANCE
    missed = {name: rate for name, rate in rates.items() if rate < GOALS[name] - tolerance}
    assert not missed, (sampler_name, cfg, rates)


def test_guidance_matters_both_ways(adherence):
    """A little guidance helps (CFG 2 beats 1 on all four right); much more over-guides and costs shape.

    Summed over the three samplers (144 images each): measured 126 vs 113 all-four hits (CFG 2 vs 1) and
    129 vs 104 shape hits (CFG 2 vs 7); asserted ≥ 5 and ≥ 12 (less than half the measured gaps).
    """
    total = {
        cfg: {name: sum(adherence[s, cfg][name] for s in SAMPLERS) for name in ("all four", "shape")} for cfg in CFGS
    }
    assert total[WORKFLOW_CFG]["all four"] - total[1.0]["all four"] >= 5, total
    assert total[WORKFLOW_CFG]["shape"] - total[7.0]["shape"] >= 12, total


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
