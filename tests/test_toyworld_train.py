"""The toy-world training script: seeded, resumable to the same bits, exports a loadable checkpoint."""

import json
import math

import pytest
import torch
from diffusers import AutoencoderKL
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


def test_object_crops_hold_the_object_and_keep_the_pixels():
    """Crops centred on the object (a pixel unlike the corner colour) contain it; every crop is a window of its
    image, unchanged."""
    images = torch.full((6, 64, 64, 3), 40, dtype=torch.uint8)
    for i in range(6):  # a 6-px object somewhere in each image
        images[i, 8 * i : 8 * i + 6, 50 - 7 * i : 56 - 7 * i] = torch.tensor([200, 10, 90], dtype=torch.uint8)
    crops = train.object_crops(images, 32, torch.Generator().manual_seed(0), object_share=1.0)
    assert crops.shape == (6, 32, 32, 3)
    for i, crop in enumerate(crops):
        assert (crop[..., 0] == 200).any(), f"crop {i} missed the object"
        windows = images[i].unfold(0, 32, 1).unfold(1, 32, 1)  # (33, 33, 3, 32, 32): every 32-px window
        assert (windows.permute(0, 1, 3, 4, 2) == crop).flatten(2).all(dim=2).any()


def test_a_cropped_vae_run_trains_on_crops_then_on_whole_images(tmp_path, monkeypatch):
    recipe = train.Recipe(
        **{**MICRO.__dict__, "vae_steps": 5, "vae_crop": 32, "vae_crop_batch": 6, "vae_whole_image_steps": 2,
           "vae_edge_focus": 3.0}
    )  # fmt: skip
    sizes = []
    crop = train.object_crops
    monkeypatch.setattr(
        train, "object_crops", lambda images, *a, **k: sizes.append(len(images)) or crop(images, *a, **k)
    )
    shapes = []
    encode = AutoencoderKL.encode
    monkeypatch.setattr(AutoencoderKL, "encode", lambda self, x, *a, **k: shapes.append(x.shape) or encode(self, x))
    assert train.run(tmp_path, recipe, "vae")
    assert sizes == [6, 6, 6]  # 5 steps, the last 2 on whole images
    assert [tuple(s) for s in shapes] == [(6, 3, 32, 32)] * 3 + [(4, 3, 64, 64)] * 2
    trained = load_state(tmp_path / "vae_state.safetensors")["model"]
    fresh = train.build_models(recipe.seed).vae.state_dict()
    assert all(torch.isfinite(v).all() for v in trained.values())
    assert any(not torch.equal(trained[k], fresh[k]) for k in fresh)


def test_edge_focus_weighs_only_pixels_near_an_edge():
    image = torch.full((1, 3, 16, 16), -1.0)
    image[..., 6:10, 6:10] = 1.0  # a square: its outline is the only edge
    weight = train._edge_focus(image, 4.0)
    assert weight.shape == (1, 1, 16, 16)
    assert weight[0, 0, 0, 0] == 1 and weight[0, 0, 15, 15] == 1  # far from the square
    assert weight[0, 0, 6, 6] == 5 and weight[0, 0, 5, 8] == 5  # on and beside its outline
    assert set(weight.unique().tolist()) == {1.0, 5.0}
    assert (train._edge_focus(torch.zeros(1, 3, 8, 8), 4.0) == 1).all()  # a flat image has no edges


def test_a_fine_tune_starts_from_the_checkpoint_and_keeps_its_text_encoder(straight, tmp_path):
    tune = tmp_path / "tune"
    digest = train.place_init_weights(tune, straight / "base.safetensors")
    recipe = train.Recipe(**{**MICRO.__dict__, "init_from": digest, "vae_steps": 1, "unet_steps": 1})
    assert train.run(tune, recipe, "all", tune / "tuned.safetensors")
    init = load_state(tune / train.INIT_WEIGHTS)
    seeded = train.build_models(MICRO.seed)

    def distances(trained: dict, component: str) -> tuple[float, float]:
        start, fresh = init[component], getattr(seeded, component).state_dict()
        to_start = max((trained[k] - start[k]).abs().max().item() for k in start)
        to_fresh = max((trained[k] - fresh[k]).abs().max().item() for k in start)
        return to_start, to_fresh

    # One warm-up step (lr 5e-6) away from the checkpoint's weights; the micro run's 4 steps (and the export's
    # float16 rounding) put those much further from a seeded start.
    for trained, component in (
        (load_state(tune / "vae_state.safetensors")["model"], "vae"),
        (load_state(tune / "unet_state.safetensors")["unet"], "unet"),
    ):
        to_start, to_fresh = distances(trained, component)
        assert 0 < to_start < to_fresh / 5, (component, to_start, to_fresh)
    text_encoder = load_state(tune / "unet_state.safetensors")["text_encoder"]
    assert all(torch.equal(text_encoder[k], init["text_encoder"][k]) for k in init["text_encoder"])
    assert not (tune / "clip_state.safetensors").exists()  # no CLIP stage: the checkpoint's encoder is kept

    from safetensors import safe_open

    with safe_open(str(tune / "tuned.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["lora_loom.recipe"])["init_from"] == digest
    assert json.loads(metadata["lora_loom.init_recipe"]) == json.loads((straight / "recipe.json").read_text())

    # The run folder holds that checkpoint's weights; a recipe naming another one is refused.
    other_folder = tmp_path / "other"
    train.place_init_weights(other_folder, straight / "base.safetensors")
    other = train.Recipe(**{**recipe.__dict__, "init_from": "0" * 64})
    with pytest.raises(SystemExit, match="another checkpoint"):
        train.run(other_folder, other, "vae")


def test_init_parts_text_encoder_trains_a_new_vae_and_unet_around_the_checkpoints_encoder(straight, tmp_path):
    new = tmp_path / "new"
    digest = train.place_init_weights(new, straight / "base.safetensors")
    recipe = train.Recipe(
        **{**MICRO.__dict__, "init_from": digest, "init_parts": "text_encoder", "vae_steps": 1, "unet_steps": 1}
    )
    assert train.run(new, recipe, "all")
    init = load_state(new / train.INIT_WEIGHTS)
    seeded = train.build_models(MICRO.seed)
    for trained, component in (
        (load_state(new / "vae_state.safetensors")["model"], "vae"),
        (load_state(new / "unet_state.safetensors")["unet"], "unet"),
    ):
        start, fresh = init[component], getattr(seeded, component).state_dict()
        to_start = max((trained[k] - start[k]).abs().max().item() for k in start)
        to_fresh = max((trained[k] - fresh[k]).abs().max().item() for k in start)
        assert 0 < to_fresh < to_start / 5, (component, to_fresh, to_start)  # one step from the seeded weights
    text_encoder = load_state(new / "unet_state.safetensors")["text_encoder"]
    assert all(torch.equal(text_encoder[k], init["text_encoder"][k]) for k in init["text_encoder"])
    with pytest.raises(SystemExit):
        train.main(["--out", str(tmp_path / "bad"), "--init-parts", "vae text"])


def test_vae_scenes_all_draws_the_held_out_concepts_for_the_vae_alone(tmp_path):
    from lora_loom.toyworld.scorer import analyse

    recipe = train.Recipe(**{**MICRO.__dict__, "n_images": 96, "vae_scenes": "all"})
    data = train.make_data(tmp_path, recipe)
    assert (
        train.make_vae_scenes(tmp_path, train.Recipe(**{**recipe.__dict__, "vae_scenes": "base"}), data)
        is (data["images"])
    )
    vae_scenes = train.make_vae_scenes(tmp_path, recipe, data)
    assert vae_scenes.shape == data["images"].shape and torch.equal(
        train.make_vae_scenes(tmp_path, recipe, data), vae_scenes
    )

    def read(images):
        return [analyse(image.numpy()) for image in images]

    vae_read, unet_read = read(vae_scenes), read(data["images"])
    assert any(p.shape == "star" for p in vae_read) and any(p.colour == "cyan" for p in vae_read)
    assert not any(p.shape == "star" or p.colour == "cyan" for p in unet_read)  # the U-Net's scenes: base only


def test_a_decoder_only_vae_run_keeps_the_latent_space_and_the_checkpoints_unet(straight, tmp_path, capsys):
    """After a base ships, its VAE can still improve without invalidating the U-Net (or LoRAs) trained on its
    latents: only the decoder trains, and with ``unet_steps`` 0 the export carries the checkpoint's U-Net and
    text encoder unchanged."""
    tune = tmp_path / "decoder"
    digest = train.place_init_weights(tune, straight / "base.safetensors")
    recipe = train.Recipe(**{**MICRO.__dict__, "init_from": digest, "vae_train_encoder": False, "unet_steps": 0})
    assert train.run(tune, recipe, "all", tune / "tuned.safetensors")
    init = load_state(tune / train.INIT_WEIGHTS)["vae"]
    final = load_state(tune / "vae_final.safetensors")
    frozen = [k for k in init if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(final[k], init[k]) for k in frozen)  # not rescaled either
    decoder = [k for k in init if k.startswith(("decoder.", "post_quant_conv."))]
    assert sum(not torch.equal(final[k], init[k]) for k in decoder) > len(decoder) / 2
    assert not (tune / "latents.safetensors").exists() and not (tune / "unet_state.safetensors").exists()

    before, after = load_file(straight / "base.safetensors"), load_file(tune / "tuned.safetensors")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("first_stage_model.decoder.") or "post_quant" in k for k in changed)

    for flags, complaint in ((["--vae-decoder-only"], "--vae-decoder-only"), (["--unet-steps", "0"], "--unet-steps 0")):
        with pytest.raises(SystemExit):
            train.main(["--out", str(tmp_path / "bad"), *flags])
        assert complaint in capsys.readouterr().err
