"""The toy-world training script: seeded, resumable to the same bits, exports a loadable checkpoint."""

import math

import pytest
import torch
from safetensors.torch import load_file

from lora_loom.lora_core.state_files import load_state
from lora_loom.sd15.base import load_base
from lora_loom.toyworld import train

MICRO = train.Recipe(
    n_images=32, vae_steps=4, vae_batch=4, clip_steps=4, clip_batch=4, unet_steps=4, unet_batch=4, checkpoint_every=100,
    vae_general_images=8, vae_edge_weight=1.0,
)  # fmt: skip


OTHER_SEED = train.Recipe(**{**MICRO.__dict__, "seed": 1})


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The micro recipe trained once, uninterrupted, through every stage and exported (shared by the tests)."""
    folder = tmp_path_factory.mktemp("straight")
    assert train.run(folder, MICRO, "all", folder / "base.safetensors")
    return folder


@pytest.fixture(scope="module")
def vae_only_other_seed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("other-seed")
    assert train.run(folder, OTHER_SEED, "vae")
    return folder


def test_interrupted_and_resumed_training_gives_the_same_weights(straight, tmp_path):
    sliced = tmp_path / "sliced"
    stops = 0
    while not train.run(sliced, MICRO, "all", sliced / "base.safetensors", stop_after=3):
        stops += 1
    assert stops == 3  # stopped once in each stage: VAE, CLIP, U-Net
    a, b = load_file(straight / "base.safetensors"), load_file(sliced / "base.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert (sliced / "loss.png").is_file()

    # The export loads like any user checkpoint.
    base = load_base(straight / "base.safetensors", dtype="fp32", device="cpu")
    assert list(base.model.components.unet.config.block_out_channels) == [32, 64, 96, 96]


def test_the_text_encoder_is_frozen_after_the_clip_stage_and_trained_without_it(straight, tmp_path):
    def text_encoder_of(folder):
        return load_state(folder / "unet_state.safetensors")["text_encoder"]

    clip_trained = load_state(straight / "text_encoder_clip.safetensors")
    after_unet = text_encoder_of(straight)
    assert all(torch.equal(clip_trained[key], after_unet[key]) for key in clip_trained)  # frozen
    seeded = train.build_models(MICRO.seed).text_encoder.state_dict()
    assert any(not torch.equal(seeded[key], clip_trained[key]) for key in seeded)  # the CLIP stage trained it
    assert "ema_text" not in load_state(straight / "unet_state.safetensors")

    joint = train.Recipe(**{**MICRO.__dict__, "clip_steps": 0})
    assert train.run(tmp_path / "joint", joint, "all")
    assert not (tmp_path / "joint" / "clip_state.safetensors").exists()
    trained_with_unet = text_encoder_of(tmp_path / "joint")
    assert any(not torch.equal(seeded[key], trained_with_unet[key]) for key in seeded)


def test_a_different_seed_gives_different_weights_and_a_new_recipe_needs_a_new_folder(straight, vae_only_other_seed):
    a = load_state(straight / "vae_state.safetensors")["model"]
    b = load_state(vae_only_other_seed / "vae_state.safetensors")["model"]
    assert any(not torch.equal(a[key], b[key]) for key in a)
    with pytest.raises(SystemExit, match="another recipe"):
        train.run(straight, OTHER_SEED, "vae")


def test_latent_rescaling_is_exact_and_gives_sd15_scale(tmp_path):
    data = train.make_data(tmp_path, MICRO)
    vae = train.build_models(0).vae.eval()
    pixels = train._to_pixels(data["images"][:8])
    with torch.no_grad():
        before = vae.decode(vae.encode(pixels).latent_dist.mean).sample
        c = train.rescale_latents(vae, data["images"], 0.18215)
        latents = vae.encode(train._to_pixels(data["images"])).latent_dist.mean
        after = vae.decode(vae.encode(pixels).latent_dist.mean).sample
    assert math.isclose(latents.std().item() * 0.18215, 1.0, rel_tol=1e-4)
    assert c > 0
    torch.testing.assert_close(after, before, atol=1e-4, rtol=0)  # float32 rounding only


def test_the_unet_stage_asks_for_the_clip_stage_first(vae_only_other_seed):
    with pytest.raises(SystemExit, match="--stage clip"):
        train.run(vae_only_other_seed, OTHER_SEED, "unet")


def test_the_vae_edge_loss_is_zero_only_for_equal_edges():
    image = torch.rand(2, 3, 8, 8)
    assert train._edge_loss(image, image) == 0
    assert train._edge_loss(image + 0.5, image) < 1e-6  # a constant shift leaves every edge as it was
    blurred = torch.nn.functional.avg_pool2d(image, 3, stride=1, padding=1)
    assert train._edge_loss(blurred, image) > 0.05
