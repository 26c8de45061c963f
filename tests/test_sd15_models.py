"""Building, saving and loading SD1.5-topology components (tiny models, offline)."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    create_diffusers_clip_model_from_ldm,
    load_single_file_checkpoint,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

from lora_loom.sd15.config_files import config_dir, load_config_dicts
from lora_loom.sd15.keys import TEXT_ENCODER_PREFIX, UNET_PREFIX, VAE_PREFIX, checkpoint_key
from lora_loom.sd15.models import (
    SD15Components,
    build_components,
    build_empty_components,
    components_state_dict_ldm,
    infer_configs,
    load_single_file,
    save_single_file,
    text_encoder_is_flat,
)

REFERENCE_KEYS = Path(__file__).parent / "data" / "sd15_checkpoint_keys.json"


@pytest.fixture(scope="module")
def tiny() -> SD15Components:
    return build_components("tiny-sd15", seed=0)


@pytest.fixture(scope="module")
def tiny_file(tiny, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sd15") / "tiny.safetensors"
    save_single_file(tiny, path)
    return path


def assert_same_weights(actual: SD15Components, expected: SD15Components) -> None:
    for component, module in expected.items():
        expected_state_dict = module.state_dict()
        actual_state_dict = actual[component].state_dict()
        assert list(actual_state_dict) == list(expected_state_dict), component
        for name, tensor in expected_state_dict.items():
            assert actual_state_dict[name].dtype == tensor.dtype, name
            assert torch.equal(actual_state_dict[name], tensor), f"{component}: {name}"


def rewrite_file(source: Path, target: Path, edit) -> Path:
    """Copy a checkpoint, letting `edit` change its {key: tensor} dict."""
    tensors = load_file(source)
    edit(tensors)
    save_file(tensors, target)
    return target


# ---------------------------------------------------------------------------------------------------------
# Configs and building
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sd15", "tiny-sd15", "toy-world-sd15"])
def test_config_dir(name):
    folder = config_dir(name)
    for subfolder in ("unet", "vae", "text_encoder"):
        assert (folder / subfolder / "config.json").is_file()
    assert (folder / "model_index.json").is_file()


def test_config_dir_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown SD1.5 config"):
        config_dir("sdxl")


def test_components_access(tiny):
    assert [name for name, _ in tiny.items()] == ["unet", "vae", "text_encoder"]
    assert tiny["unet"] is tiny.unet
    assert tiny["text_encoder"] is tiny.text_encoder
    with pytest.raises(KeyError):
        tiny["tokenizer"]


def test_build_is_deterministic_and_leaves_global_rng_alone(tiny):
    rng_state = torch.get_rng_state()
    again = build_components("tiny-sd15", seed=0)
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert_same_weights(again, tiny)

    other_seed = build_components("tiny-sd15", seed=1)
    assert not torch.equal(other_seed.unet.conv_in.weight, tiny.unet.conv_in.weight)
    assert not torch.equal(other_seed.vae.encoder.conv_in.weight, tiny.vae.encoder.conv_in.weight)
    token_embedding = "embeddings.token_embedding.weight"
    if not text_encoder_is_flat(tiny.text_encoder):
        token_embedding = "text_model." + token_embedding
    assert not torch.equal(
        other_seed.text_encoder.state_dict()[token_embedding], tiny.text_encoder.state_dict()[token_embedding]
    )


def test_build_in_half_precision_casts_the_float32_weights(tiny):
    half = build_components("tiny-sd15", seed=0, dtype=torch.float16)
    for component, module in half.items():
        assert not module.training
        expected = tiny[component].state_dict()
        for name, tensor in module.state_dict().items():
            assert tensor.dtype == torch.float16, name
            assert torch.equal(tensor, expected[name].to(torch.float16)), name


def test_text_encoder_is_flat(tiny):
    # transformers >= 5.6 has no `text_model` level; older versions do.
    assert text_encoder_is_flat(tiny.text_encoder) == (not hasattr(tiny.text_encoder, "text_model"))


# ---------------------------------------------------------------------------------------------------------
# The single-file layout
# ---------------------------------------------------------------------------------------------------------


def test_full_size_ldm_state_dict_matches_a_real_checkpoint():
    reference = json.loads(REFERENCE_KEYS.read_text())["tensors"]
    full_size = build_empty_components(*load_config_dicts("sd15"))
    state_dict = components_state_dict_ldm(full_size)
    assert {key: list(tensor.shape) for key, tensor in state_dict.items()} == reference


@pytest.mark.parametrize("name", ["tiny-sd15", "toy-world-sd15"])
def test_small_configs_have_every_key_name_of_a_real_checkpoint(name):
    # Widths must grow at the same levels as SD1.5's, or the shortcut convs SD1.5 has there vanish.
    reference = json.loads(REFERENCE_KEYS.read_text())["tensors"]
    small = components_state_dict_ldm(build_empty_components(*load_config_dicts(name)))
    assert set(small) == set(reference)
    assert all(len(small[key].shape) == len(shape) for key, shape in reference.items())


def test_saved_file_layout(tiny, tiny_file):
    with safe_open(str(tiny_file), framework="pt") as checkpoint:
        keys = set(checkpoint.keys())
        assert checkpoint.metadata() == {"format": "pt"}
        q_shape = checkpoint.get_slice("first_stage_model.encoder.mid.attn_1.q.weight").get_shape()
    assert keys == set(components_state_dict_ldm(tiny))
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys
    assert q_shape == [96, 96, 1, 1]


# ---------------------------------------------------------------------------------------------------------
# Save -> load round trips
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_round_trip_is_bitwise(dtype, tmp_path):
    components = build_components("tiny-sd15", seed=3, dtype=dtype)
    path = tmp_path / "model.safetensors"
    save_single_file(components, path)

    loaded, sources = load_single_file(path)

    assert_same_weights(loaded, components)
    with safe_open(str(path), framework="pt") as checkpoint:
        file_keys = set(checkpoint.keys())
    for component, module in loaded.items():
        assert not module.training
        # Every model parameter, under the model's own name, comes from its checkpoint key.
        assert list(sources[component]) == list(module.state_dict())
        for name, key in sources[component].items():
            assert key == checkpoint_key(component, name)
    assert {key for source in sources.values() for key in source.values()} == file_keys


def test_loaded_models_compute_the_same_outputs(tiny, tiny_file):
    loaded, _ = load_single_file(tiny_file)
    generator = torch.Generator().manual_seed(0)
    token_ids = torch.randint(0, 49408, (2, 77), generator=generator)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    image = torch.randn(1, 3, 16, 16, generator=generator)

    with torch.no_grad():
        for components in (tiny, loaded):
            # The text encoder also exercises the position_ids buffer, which is rebuilt on load.
            hidden_states = components.text_encoder(token_ids).last_hidden_state
            noise = components.unet(latents, 10, encoder_hidden_states=hidden_states).sample
            decoded = components.vae.decode(latents).sample
            posterior_mean = components.vae.encode(image).latent_dist.mean
            if components is tiny:
                expected = (hidden_states, noise, decoded, posterior_mean)
    for actual, wanted in zip((hidden_states, noise, decoded, posterior_mean), expected, strict=True):
        assert torch.equal(actual, wanted)


def test_save_and_load_convert_dtypes(tiny, tmp_path):
    path = tmp_path / "half.safetensors"
    save_single_file(tiny, path, dtype=torch.float16, metadata={"title": "tiny"})
    with safe_open(str(path), framework="pt") as checkpoint:
        assert checkpoint.metadata() == {"format": "pt", "title": "tiny"}

    half, _ = load_single_file(path)
    back_to_float, _ = load_single_file(path, dtype=torch.float32)
    for component, module in tiny.items():
        original = module.state_dict()
        half_state_dict = half[component].state_dict()
        float_state_dict = back_to_float[component].state_dict()
        for name, tensor in original.items():
            assert torch.equal(half_state_dict[name], tensor.to(torch.float16)), name
            assert torch.equal(float_state_dict[name], tensor.to(torch.float16).to(torch.float32)), name
            assert float_state_dict[name].dtype == torch.float32


def test_load_ignores_non_model_keys(tiny, tiny_file, tmp_path):
    def add_extras(tensors):
        tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
        tensors["model_ema.decay"] = torch.tensor(0.9999)
        tensors["model_ema.diffusion_modelinput_blocks00weight"] = torch.zeros(32, 4, 3, 3)
        tensors["alphas_cumprod"] = torch.linspace(1, 0, 1000)

    path = rewrite_file(tiny_file, tmp_path / "extras.safetensors", add_extras)
    loaded, sources = load_single_file(path)
    assert_same_weights(loaded, tiny)
    used_keys = {key for source in sources.values() for key in source.values()}
    assert "alphas_cumprod" not in used_keys


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------


def test_load_reports_missing_unexpected_and_mis_shaped_tensors(tiny_file, tmp_path):
    def damage(tensors):
        del tensors["model.diffusion_model.input_blocks.1.0.in_layers.0.weight"]
        del tensors["cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc2.bias"]
        tensors["model.diffusion_model.label_emb.0.0.weight"] = torch.zeros(4, 4)
        tensors["first_stage_model.encoder.down.0.block.0.nin_shortcut.weight"] = torch.zeros(32, 32, 1, 1)
        tensors["model.diffusion_model.input_blocks.1.0.emb_layers.1.bias"] = torch.zeros(33)

    path = rewrite_file(tiny_file, tmp_path / "damaged.safetensors", damage)
    with pytest.raises(ValueError) as error:
        load_single_file(path)
    lines = str(error.value).splitlines()
    assert lines[0] == f"{path}: does not match the SD1.5 layout:"
    unet, text, vae = UNET_PREFIX, TEXT_ENCODER_PREFIX + "text_model.", VAE_PREFIX
    assert sorted(line.strip() for line in lines[1:]) == [
        f"text_encoder: 1 missing tensor(s): {text}encoder.layers.3.mlp.fc2.bias",
        f"unet: 1 missing tensor(s): {unet}input_blocks.1.0.in_layers.0.weight",
        f"unet: 1 shape mismatch(es): {unet}input_blocks.1.0.emb_layers.1.bias [33] (expected [32])",
        f"unet: 1 unexpected tensor(s): {unet}label_emb.0.0.weight",
        # SD1.5 keeps its width at the first level, so no shortcut conv exists there.
        f"vae: 1 unexpected tensor(s): {vae}encoder.down.0.block.0.nin_shortcut.weight",
    ]


def test_load_rejects_other_files(tmp_path):
    not_sd15 = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(4, 4)}, not_sd15)
    with pytest.raises(ValueError, match="not an SD1.5 checkpoint"):
        load_single_file(not_sd15)
    with pytest.raises(ValueError, match="only .safetensors"):
        load_single_file(tmp_path / "model.ckpt")


# ---------------------------------------------------------------------------------------------------------
# diffusers reads our files
# ---------------------------------------------------------------------------------------------------------


def test_diffusers_from_single_file_reads_our_file(tiny, tiny_file, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = str(config_dir("tiny-sd15"))
    unet = UNet2DConditionModel.from_single_file(str(tiny_file), config=config, subfolder="unet", local_files_only=True)
    vae = AutoencoderKL.from_single_file(str(tiny_file), config=config, subfolder="vae", local_files_only=True)
    # What StableDiffusionPipeline.from_single_file uses for the CLIP text encoder.
    checkpoint = load_single_file_checkpoint(str(tiny_file), local_files_only=True)
    text_encoder = create_diffusers_clip_model_from_ldm(
        CLIPTextModel, checkpoint, subfolder="text_encoder", config=config, local_files_only=True
    )
    assert_same_weights(SD15Components(unet=unet, vae=vae, text_encoder=text_encoder), tiny)


# ---------------------------------------------------------------------------------------------------------
# Config inference
# ---------------------------------------------------------------------------------------------------------

UNET_FIELDS = (
    "block_out_channels",
    "cross_attention_dim",
    "in_channels",
    "out_channels",
    "attention_head_dim",
)
VAE_FIELDS = ("block_out_channels", "in_channels", "out_channels", "latent_channels")
TEXT_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
)


def test_infer_configs_of_a_real_checkpoint_gives_the_sd15_configs():
    shapes = json.loads(REFERENCE_KEYS.read_text())["tensors"]
    assert infer_configs(shapes) == load_config_dicts("sd15")


def test_infer_configs_of_tiny_shapes(tiny_file):
    with safe_open(str(tiny_file), framework="pt") as checkpoint:
        shapes = {key: tuple(checkpoint.get_slice(key).get_shape()) for key in checkpoint.keys()}
    unet_config, vae_config, text_encoder_config = infer_configs(shapes)
    expected_unet, expected_vae, expected_text_encoder = load_config_dicts("tiny-sd15")
    for field in UNET_FIELDS:
        assert unet_config[field] == expected_unet[field], field
    for field in VAE_FIELDS:
        assert vae_config[field] == expected_vae[field], field
    for field in TEXT_FIELDS:
        assert text_encoder_config[field] == expected_text_encoder[field], field


def test_infer_configs_names_the_missing_tensor():
    with pytest.raises(KeyError, match="model.diffusion_model.input_blocks.1.0.in_layers.2.weight"):
        infer_configs({})
