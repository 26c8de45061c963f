"""SD1.5 key maps vs. the real checkpoint layout, the models and diffusers' own single-file converters."""

import json
from pathlib import Path

import pytest
import torch
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)

from lora_loom.sd15.config_files import load_config_dicts
from lora_loom.sd15.keys import (
    VAE_ATTENTION_CONV_KEYS,
    checkpoint_key,
    split_checkpoint_key,
    text_encoder_ldm_to_transformers,
    text_encoder_transformers_to_ldm,
    unet_diffusers_to_ldm,
    unet_ldm_to_diffusers,
    vae_diffusers_to_ldm,
    vae_key_needs_reshape,
    vae_ldm_to_diffusers,
)
from lora_loom.sd15.models import (
    build_components,
    build_empty_components,
    components_state_dict_ldm,
    text_encoder_is_flat,
)

REFERENCE_KEYS = Path(__file__).parent / "data" / "sd15_checkpoint_keys.json"
# diffusers ModuleLists whose items are the blocks the maps translate as a whole.
BLOCK_LISTS = ("resnets", "attentions", "downsamplers", "upsamplers")


@pytest.fixture(scope="module")
def reference_shapes() -> dict[str, list[int]]:
    """{LDM key: shape} of all 1130 tensors of a real SD1.5 single-file checkpoint."""
    return json.loads(REFERENCE_KEYS.read_text())["tensors"]


@pytest.fixture(scope="module")
def full_size():
    """Full-size SD1.5 models from the shipped configs, on the meta device."""
    return build_empty_components(*load_config_dicts("sd15"))


@pytest.fixture(scope="module")
def tiny():
    return build_components("tiny-sd15", seed=0)


def _model_name(component: str, name: str, module: torch.nn.Module) -> str:
    """A split_checkpoint_key name as the model spells it (flat text encoder on transformers >= 5.6)."""
    if component == "text_encoder":
        return text_encoder_ldm_to_transformers(name, flat=text_encoder_is_flat(module))
    return name


def _owns_parameters(module: torch.nn.Module) -> bool:
    return len(list(module.parameters(recurse=False))) > 0


def _file_shape(component: str, name: str, tensor: torch.Tensor) -> list[int]:
    shape = list(tensor.shape)
    if component == "vae" and vae_key_needs_reshape(name):
        shape += [1, 1]
    return shape


# ---------------------------------------------------------------------------------------------------------
# Against the real checkpoint layout and the models
# ---------------------------------------------------------------------------------------------------------


def test_reference_keys_map_one_to_one_onto_full_size_model(reference_shapes, full_size):
    assert len(reference_shapes) == 1130
    model_state_dicts = {component: module.state_dict() for component, module in full_size.items()}
    mapped = {component: set() for component in model_state_dicts}

    for key, shape in reference_shapes.items():
        split = split_checkpoint_key(key)
        assert split is not None, key
        component, name = split
        module = full_size[component]
        model_name = _model_name(component, name, module)
        assert model_name in model_state_dicts[component], key
        assert _file_shape(component, name, model_state_dicts[component][model_name]) == shape, key
        assert model_name not in mapped[component], f"{key} maps onto an already mapped parameter"
        mapped[component].add(model_name)
        assert checkpoint_key(component, name) == key
        assert checkpoint_key(component, model_name) == key

    for component, state_dict in model_state_dicts.items():
        assert mapped[component] == set(state_dict), f"{component} parameters without a checkpoint key"


def test_every_parameter_owning_module_and_block_maps_both_ways(full_size):
    for component, to_ldm, to_diffusers in (
        ("unet", unet_diffusers_to_ldm, unet_ldm_to_diffusers),
        ("vae", vae_diffusers_to_ldm, vae_ldm_to_diffusers),
    ):
        checked = 0
        for name, module in full_size[component].named_modules():
            owns_parameters = _owns_parameters(module)
            parts = name.split(".")
            is_block = len(parts) >= 2 and parts[-2] in BLOCK_LISTS
            if owns_parameters or is_block:
                assert to_diffusers(to_ldm(name)) == name
                checked += 1
        assert checked > 100, component


@pytest.mark.parametrize(
    ("ldm", "diffusers"),
    [
        ("input_blocks.1.1.proj_in", "down_blocks.0.attentions.0.proj_in"),
        ("input_blocks.1.1.proj_in.weight", "down_blocks.0.attentions.0.proj_in.weight"),
        (
            "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        ),
        (
            "input_blocks.8.1.transformer_blocks.0.attn2.to_out.0.bias",
            "down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_out.0.bias",
        ),
        ("input_blocks.0.0.weight", "conv_in.weight"),
        ("time_embed.0", "time_embedding.linear_1"),
        ("time_embed.2.bias", "time_embedding.linear_2.bias"),
        ("input_blocks.1.0", "down_blocks.0.resnets.0"),
        ("input_blocks.1.0.in_layers.0.weight", "down_blocks.0.resnets.0.norm1.weight"),
        ("input_blocks.2.0.in_layers.2", "down_blocks.0.resnets.1.conv1"),
        ("input_blocks.4.0.emb_layers.1.bias", "down_blocks.1.resnets.0.time_emb_proj.bias"),
        ("input_blocks.5.0.out_layers.0", "down_blocks.1.resnets.1.norm2"),
        ("input_blocks.7.0.out_layers.3.weight", "down_blocks.2.resnets.0.conv2.weight"),
        ("input_blocks.7.0.skip_connection", "down_blocks.2.resnets.0.conv_shortcut"),
        ("input_blocks.3.0.op.weight", "down_blocks.0.downsamplers.0.conv.weight"),
        ("input_blocks.9.0", "down_blocks.2.downsamplers.0"),
        ("input_blocks.11.0.in_layers.2", "down_blocks.3.resnets.1.conv1"),
        ("middle_block.0.emb_layers.1", "mid_block.resnets.0.time_emb_proj"),
        (
            "middle_block.1.transformer_blocks.0.ff.net.0.proj",
            "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
        ),
        ("middle_block.2.out_layers.3.bias", "mid_block.resnets.1.conv2.bias"),
        ("output_blocks.0.0.skip_connection.weight", "up_blocks.0.resnets.0.conv_shortcut.weight"),
        ("output_blocks.2.1.conv", "up_blocks.0.upsamplers.0.conv"),
        ("output_blocks.3.1.proj_out", "up_blocks.1.attentions.0.proj_out"),
        ("output_blocks.5.2.conv.weight", "up_blocks.1.upsamplers.0.conv.weight"),
        ("output_blocks.8.2", "up_blocks.2.upsamplers.0"),
        (
            "output_blocks.11.1.transformer_blocks.0.norm3",
            "up_blocks.3.attentions.2.transformer_blocks.0.norm3",
        ),
        ("out.0.weight", "conv_norm_out.weight"),
        ("out.2", "conv_out"),
    ],
)
def test_unet_names(ldm, diffusers):
    assert unet_ldm_to_diffusers(ldm) == diffusers
    assert unet_diffusers_to_ldm(diffusers) == ldm


@pytest.mark.parametrize(
    ("ldm", "diffusers"),
    [
        ("encoder.conv_in.weight", "encoder.conv_in.weight"),
        ("encoder.down.0.block.1.conv2", "encoder.down_blocks.0.resnets.1.conv2"),
        (
            "encoder.down.1.block.0.nin_shortcut.weight",
            "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
        ),
        ("encoder.down.2.downsample.conv", "encoder.down_blocks.2.downsamplers.0.conv"),
        ("encoder.mid.block_1.norm1.bias", "encoder.mid_block.resnets.0.norm1.bias"),
        ("encoder.mid.attn_1.norm.weight", "encoder.mid_block.attentions.0.group_norm.weight"),
        ("encoder.mid.attn_1.q", "encoder.mid_block.attentions.0.to_q"),
        ("encoder.mid.attn_1.k.bias", "encoder.mid_block.attentions.0.to_k.bias"),
        ("decoder.mid.attn_1.v.weight", "decoder.mid_block.attentions.0.to_v.weight"),
        ("decoder.mid.attn_1.proj_out", "decoder.mid_block.attentions.0.to_out.0"),
        ("decoder.mid.block_2.conv1.bias", "decoder.mid_block.resnets.1.conv1.bias"),
        ("decoder.up.0.block.0.nin_shortcut", "decoder.up_blocks.3.resnets.0.conv_shortcut"),
        ("decoder.up.0.block.2.norm2.weight", "decoder.up_blocks.3.resnets.2.norm2.weight"),
        ("decoder.up.3.block.0", "decoder.up_blocks.0.resnets.0"),
        ("decoder.up.3.upsample.conv.weight", "decoder.up_blocks.0.upsamplers.0.conv.weight"),
        ("decoder.up.1.upsample", "decoder.up_blocks.2.upsamplers.0"),
        ("encoder.norm_out.weight", "encoder.conv_norm_out.weight"),
        ("decoder.norm_out", "decoder.conv_norm_out"),
        ("quant_conv.weight", "quant_conv.weight"),
        ("post_quant_conv.bias", "post_quant_conv.bias"),
    ],
)
def test_vae_names(ldm, diffusers):
    assert vae_ldm_to_diffusers(ldm) == diffusers
    assert vae_diffusers_to_ldm(diffusers) == ldm


@pytest.mark.parametrize(
    ("function", "name"),
    [
        (unet_ldm_to_diffusers, "input_blocks.1.0.in_layers"),  # an LDM-only Sequential
        (unet_ldm_to_diffusers, "input_blocks.1.0.skip_connection.weight"),  # level 0 keeps its width
        (unet_ldm_to_diffusers, "input_blocks.10.1.proj_in"),  # no attention on the lowest level
        (unet_ldm_to_diffusers, "input_blocks.12.0.in_layers.0.weight"),
        (unet_ldm_to_diffusers, "output_blocks.2.2.conv.weight"),  # that upsampler sits at index 1
        (unet_ldm_to_diffusers, "input_blocks.1.1.transformer_blocks.0.attn1.to_q.bias"),
        (unet_ldm_to_diffusers, "input_blocks.1.1.proj_in.lora_up.weight"),
        (unet_ldm_to_diffusers, "model.diffusion_model.input_blocks.1.1.proj_in"),
        (unet_ldm_to_diffusers, "down_blocks.0.attentions.0.proj_in"),
        (unet_diffusers_to_ldm, "down_blocks.3.attentions.0.proj_in"),
        (unet_diffusers_to_ldm, "up_blocks.3.upsamplers.0.conv"),
        (unet_diffusers_to_ldm, "down_blocks.0.resnets.0.nonlinearity"),
        (unet_diffusers_to_ldm, "input_blocks.1.1.proj_in"),
        (vae_ldm_to_diffusers, "decoder.up.0.upsample.conv"),
        (vae_ldm_to_diffusers, "encoder.down.3.downsample.conv.weight"),
        (vae_ldm_to_diffusers, "first_stage_model.encoder.conv_in.weight"),
        (vae_diffusers_to_ldm, "decoder.up_blocks.3.upsamplers.0.conv"),
        (vae_diffusers_to_ldm, "encoder.mid_block.attentions.0.to_out"),
        (text_encoder_transformers_to_ldm, "text_model.embeddings.position_ids"),
        (text_encoder_transformers_to_ldm, "encoder.layers.0.self_attn.qkv.weight"),
        (text_encoder_transformers_to_ldm, "encoder.layers.x.mlp.fc1.weight"),
        (text_encoder_transformers_to_ldm, "encoder.layers.0."),
        (text_encoder_transformers_to_ldm, "cond_stage_model.transformer.text_model.final_layer_norm"),
    ],
)
def test_unknown_names_raise_key_error(function, name):
    with pytest.raises(KeyError, match="unknown SD1.5"):
        function(name)


def test_prefixed_names_get_a_hint():
    with pytest.raises(KeyError, match="without the 'model.diffusion_model.' prefix"):
        unet_ldm_to_diffusers("model.diffusion_model.input_blocks.1.1.proj_in")


def test_text_encoder_names():
    name = "text_model.encoder.layers.11.self_attn.q_proj.weight"
    assert text_encoder_ldm_to_transformers(name, flat=True) == "encoder.layers.11.self_attn.q_proj.weight"
    assert text_encoder_ldm_to_transformers(name, flat=False) == name
    assert text_encoder_transformers_to_ldm("encoder.layers.11.self_attn.q_proj.weight") == name
    assert text_encoder_transformers_to_ldm(name) == name
    assert text_encoder_transformers_to_ldm("encoder.layers.3.mlp.fc2") == "text_model.encoder.layers.3.mlp.fc2"
    assert text_encoder_transformers_to_ldm("final_layer_norm.bias") == "text_model.final_layer_norm.bias"
    with pytest.raises(KeyError):
        text_encoder_ldm_to_transformers("encoder.layers.0.mlp.fc1.weight", flat=True)  # needs `text_model.`


def test_text_encoder_names_of_the_installed_transformers(tiny):
    text_encoder = tiny.text_encoder
    flat = text_encoder_is_flat(text_encoder)
    assert flat == (not hasattr(text_encoder, "text_model"))
    names = list(text_encoder.state_dict())
    names += [name for name, module in text_encoder.named_modules() if _owns_parameters(module)]
    for name in names:
        ldm_name = text_encoder_transformers_to_ldm(name)
        assert ldm_name.startswith("text_model.")
        assert text_encoder_ldm_to_transformers(ldm_name, flat=flat) == name


@pytest.mark.parametrize(
    "key",
    [
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
        "cond_stage_model.transformer.embeddings.position_ids",
        "model_ema.decay",
        "model_ema.num_updates",
        "model_ema.diffusion_modelinput_blocks00weight",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "betas",
        "logvar",
        "sqrt_recipm1_alphas_cumprod",
    ],
)
def test_split_ignores_non_model_keys(key):
    assert split_checkpoint_key(key) is None


def test_split_accepts_old_text_encoder_spelling():
    split = split_checkpoint_key("cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight")
    assert split == ("text_encoder", "text_model.encoder.layers.0.mlp.fc1.weight")


@pytest.mark.parametrize(
    "key",
    [
        "model.diffusion_model.label_emb.0.0.weight",  # SDXL / class-conditioned U-Nets
        "model.diffusion_model.input_blocks.1.1.proj_in",  # a module path, not a tensor
        "first_stage_model.encoder.down.0.block.0",
        "first_stage_model.decoder.up.0.upsample.conv.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp",
        "cond_stage_model.transformer.text_model.pooler.weight",
    ],
)
def test_split_rejects_unknown_model_keys(key):
    with pytest.raises(KeyError):
        split_checkpoint_key(key)


def test_checkpoint_key():
    assert checkpoint_key("unet", "conv_in.weight") == "model.diffusion_model.input_blocks.0.0.weight"
    assert checkpoint_key("vae", "decoder.up_blocks.0.upsamplers.0.conv.bias") == (
        "first_stage_model.decoder.up.3.upsample.conv.bias"
    )
    assert checkpoint_key("text_encoder", "final_layer_norm.weight") == (
        "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    )
    with pytest.raises(ValueError, match="unknown SD1.5 component"):
        checkpoint_key("refiner", "conv_in.weight")


def test_vae_attention_conv_keys(full_size):
    vae_state_dict = full_size.vae.state_dict()
    assert len(VAE_ATTENTION_CONV_KEYS) == 8
    for key in VAE_ATTENTION_CONV_KEYS:
        assert vae_state_dict[key].ndim == 2
    two_dimensional = {name for name, tensor in vae_state_dict.items() if tensor.ndim == 2}
    assert two_dimensional == VAE_ATTENTION_CONV_KEYS


# ---------------------------------------------------------------------------------------------------------
# Against diffusers' own single-file converters
# ---------------------------------------------------------------------------------------------------------


def _split_by_component(checkpoint: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Our conversion of an LDM state dict: {component: {diffusers / `text_model.` name: tensor}}."""
    by_component = {"unet": {}, "vae": {}, "text_encoder": {}}
    for key, tensor in checkpoint.items():
        component, name = split_checkpoint_key(key)
        if component == "vae" and vae_key_needs_reshape(name):
            tensor = tensor[:, :, 0, 0]
        by_component[component][name] = tensor
    return by_component


def _assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].shape == tensor.shape, name
        if tensor.device.type != "meta":
            assert torch.equal(actual[name], tensor), name


def test_same_as_diffusers_converters_on_tiny_model(tiny):
    checkpoint = components_state_dict_ldm(tiny)
    ours = _split_by_component(checkpoint)
    unet_config, vae_config, _ = load_config_dicts("tiny-sd15")

    diffusers_unet = convert_ldm_unet_checkpoint(checkpoint, unet_config)
    diffusers_vae = convert_ldm_vae_checkpoint(checkpoint, vae_config)
    diffusers_text_encoder = convert_ldm_clip_checkpoint(checkpoint)

    _assert_same_tensors(diffusers_unet, ours["unet"])
    _assert_same_tensors(diffusers_vae, ours["vae"])
    _assert_same_tensors(diffusers_text_encoder, ours["text_encoder"])
    # ... and both are the models' own tensors.
    _assert_same_tensors(diffusers_unet, tiny.unet.state_dict())
    _assert_same_tensors(diffusers_vae, tiny.vae.state_dict())
    text_encoder_state_dict = {
        text_encoder_transformers_to_ldm(name): tensor for name, tensor in tiny.text_encoder.state_dict().items()
    }
    _assert_same_tensors(diffusers_text_encoder, text_encoder_state_dict)


def test_same_as_diffusers_converters_on_reference_layout(reference_shapes):
    checkpoint = {key: torch.empty(shape, device="meta") for key, shape in reference_shapes.items()}
    ours = _split_by_component(checkpoint)
    unet_config, vae_config, _ = load_config_dicts("sd15")

    _assert_same_tensors(convert_ldm_unet_checkpoint(checkpoint, unet_config), ours["unet"])
    _assert_same_tensors(convert_ldm_vae_checkpoint(checkpoint, vae_config), ours["vae"])
    _assert_same_tensors(convert_ldm_clip_checkpoint(checkpoint), ours["text_encoder"])
