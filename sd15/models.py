"""Build, load and save SD1.5-topology models with diffusers / transformers classes, fully offline.

- ``build_components`` makes seeded random U-Net, VAE and CLIP text encoder from a shipped config
  ("sd15" full size, "tiny-sd15" for tests).
- ``save_single_file`` writes them as a single-file checkpoint in the original LDM layout, as real SD1.5
  checkpoints are (see :mod:`.sd15_keys` for the name maps).
- ``load_single_file`` reads such a ``.safetensors`` file back: configs inferred from tensor shapes,
  modules created on the meta device (no random init) and the file tensors assigned to them.

The text encoder's parameter names depend on the transformers version (flat since 5.6, see
:func:`text_encoder_is_flat`); files always use the ``text_model.`` spelling.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from .config_files import load_config_dicts
from .keys import (
    COMPONENT_NAMES,
    TEXT_ENCODER_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    checkpoint_key,
    split_checkpoint_key,
    text_encoder_is_flat,
    text_encoder_transformers_to_ldm,
    vae_key_needs_reshape,
)

# CLIP ViT-L/14 (SD1.5's text encoder) uses 64-dimensional attention heads.
_TEXT_ENCODER_HEAD_DIM = 64
# How many names an error message lists per group before it only counts the rest.
_MAX_NAMES_IN_ERROR = 8


@dataclass
class SD15Components:
    """The three models of an SD1.5 checkpoint."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel

    def items(self) -> list[tuple[str, torch.nn.Module]]:
        """(component name, module) pairs in the order unet, vae, text_encoder."""
        return [(name, getattr(self, name)) for name in COMPONENT_NAMES]

    def __getitem__(self, name: str) -> torch.nn.Module:
        if name not in COMPONENT_NAMES:
            raise KeyError(f"unknown SD1.5 component {name!r}; expected one of {COMPONENT_NAMES}")
        return getattr(self, name)


def _instantiate(unet_config: dict, vae_config: dict, text_encoder_config: dict) -> SD15Components:
    return SD15Components(
        unet=UNet2DConditionModel.from_config(dict(unet_config)),
        vae=AutoencoderKL.from_config(dict(vae_config)),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_dict(dict(text_encoder_config))),
    )


def build_empty_components(unet_config: dict, vae_config: dict, text_encoder_config: dict) -> SD15Components:
    """Components with every tensor on the meta device: no memory, no init; for shapes and names only."""
    with torch.device("meta"):
        return _instantiate(unet_config, vae_config, text_encoder_config)


def build_components(
    config: str = "tiny-sd15",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> SD15Components:
    """Components with deterministic random weights: the same seed gives bitwise the same weights.

    Weights come from the libraries' own initialisers, run in float32 on the CPU under a private
    ``torch.manual_seed(seed)`` (the global RNG state is left untouched), then cast to ``dtype`` and
    moved to ``device``. Full-size "sd15" (~1.07 B parameters) takes ~15 s on 2 CPU cores in a fresh
    process (~6 s when repeated), fast enough that no custom initialiser is needed; use
    :func:`build_empty_components` when only names and shapes matter.
    """
    unet_config, vae_config, text_encoder_config = load_config_dicts(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        components = _instantiate(unet_config, vae_config, text_encoder_config)
    for _, module in components.items():
        # Plain nn.Module.to: diffusers 0.42's ModelMixin.to logs a spurious "should be kept in float32: []"
        # warning on every dtype cast; its other checks only concern quantized / offloaded models.
        torch.nn.Module.to(module, device=device, dtype=dtype)
        module.eval()
    return components


# ---------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------


def components_state_dict_ldm(components: SD15Components) -> dict[str, torch.Tensor]:
    """All weights under their single-file (LDM) keys, VAE attention weights in [C, C, 1, 1] conv form.

    The tensors are the modules' own (views, no copies).
    """
    state_dict = {}
    for component, module in components.items():
        for name, tensor in module.state_dict().items():
            if component == "vae" and vae_key_needs_reshape(name):
                tensor = tensor.reshape(*tensor.shape, 1, 1)
            state_dict[checkpoint_key(component, name)] = tensor
    return state_dict


def save_single_file(
    components: SD15Components,
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write an SD1.5 single-file ``.safetensors`` checkpoint in the original layout.

    ``dtype`` converts every tensor with ``tensor.to(dtype)`` (None keeps the modules' dtypes).
    ``metadata`` is stored in the safetensors header next to ``{"format": "pt"}``.
    """
    tensors = {}
    for key, tensor in components_state_dict_ldm(components).items():
        if dtype is not None:
            tensor = tensor.to(dtype)
        tensors[key] = tensor.detach().to("cpu").contiguous()
    save_file(tensors, str(path), metadata={"format": "pt", **(metadata or {})})


# ---------------------------------------------------------------------------------------------------------
# Config inference
# ---------------------------------------------------------------------------------------------------------


def _split_shapes(shapes: dict[str, tuple]) -> dict[str, dict[str, tuple[int, ...]]]:
    """{component: {diffusers/transformers key (``text_model.`` spelling): shape}}; unknown keys dropped."""
    by_component: dict[str, dict[str, tuple[int, ...]]] = {name: {} for name in COMPONENT_NAMES}
    for key, shape in shapes.items():
        try:
            split = split_checkpoint_key(key)
        except KeyError:
            continue
        if split is not None:
            component, name = split
            by_component[component][name] = tuple(shape)
    return by_component


def _shape_of(shapes: dict[str, tuple[int, ...]], component: str, name: str) -> tuple[int, ...]:
    try:
        return shapes[name]
    except KeyError:
        key = checkpoint_key(component, name)
        raise KeyError(f"cannot infer the SD1.5 {component} config: tensor {key!r} is missing") from None


def infer_configs(shapes: dict[str, tuple]) -> tuple[dict, dict, dict]:
    """(unet, vae, text_encoder) config dicts from a checkpoint's {LDM key: shape}.

    Starts from the shipped full-size "sd15" configs and replaces what the shapes determine: channel
    widths, cross-attention width, text width / depth / vocabulary / MLP width / positions. The U-Net
    keeps 8 attention heads (``attention_head_dim: 8`` in diffusers' SD1.5 semantics); the text encoder
    gets ``width // 64`` heads (at least 1). What shapes cannot tell (``sample_size``, norm groups,
    ``scaling_factor``) keeps the SD1.5 values.
    """
    unet_config, vae_config, text_encoder_config = load_config_dicts("sd15")
    by_component = _split_shapes(shapes)

    unet = by_component["unet"]
    num_levels = len(unet_config["block_out_channels"])
    unet_config["block_out_channels"] = [
        _shape_of(unet, "unet", f"down_blocks.{level}.resnets.0.conv1.weight")[0] for level in range(num_levels)
    ]
    unet_config["in_channels"] = _shape_of(unet, "unet", "conv_in.weight")[1]
    unet_config["out_channels"] = _shape_of(unet, "unet", "conv_out.weight")[0]
    cross_attention_key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    unet_config["cross_attention_dim"] = _shape_of(unet, "unet", cross_attention_key)[1]

    vae = by_component["vae"]
    num_levels = len(vae_config["block_out_channels"])
    vae_config["block_out_channels"] = [
        _shape_of(vae, "vae", f"encoder.down_blocks.{level}.resnets.0.conv1.weight")[0] for level in range(num_levels)
    ]
    vae_config["in_channels"] = _shape_of(vae, "vae", "encoder.conv_in.weight")[1]
    vae_config["out_channels"] = _shape_of(vae, "vae", "decoder.conv_out.weight")[0]
    vae_config["latent_channels"] = _shape_of(vae, "vae", "post_quant_conv.weight")[0]

    text = by_component["text_encoder"]
    vocab_size, hidden_size = _shape_of(text, "text_encoder", "text_model.embeddings.token_embedding.weight")
    layers_prefix = "text_model.encoder.layers."
    layer_indices = {int(name[len(layers_prefix) :].split(".")[0]) for name in text if name.startswith(layers_prefix)}
    if layer_indices != set(range(len(layer_indices))):
        raise KeyError(f"cannot infer the SD1.5 text_encoder config: layer indices {sorted(layer_indices)}")
    text_encoder_config["vocab_size"] = vocab_size
    text_encoder_config["hidden_size"] = hidden_size
    text_encoder_config["projection_dim"] = hidden_size
    text_encoder_config["num_attention_heads"] = max(1, hidden_size // _TEXT_ENCODER_HEAD_DIM)
    text_encoder_config["num_hidden_layers"] = len(layer_indices)
    text_encoder_config["intermediate_size"] = _shape_of(
        text, "text_encoder", "text_model.encoder.layers.0.mlp.fc1.weight"
    )[0]
    text_encoder_config["max_position_embeddings"] = _shape_of(
        text, "text_encoder", "text_model.embeddings.position_embedding.weight"
    )[0]
    return unet_config, vae_config, text_encoder_config


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------


_COMPONENT_PREFIXES = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": TEXT_ENCODER_PREFIX}


def _component_of_key(key: str) -> str:
    for component, prefix in _COMPONENT_PREFIXES.items():
        if key.startswith(prefix):
            return component
    raise ValueError(f"{key!r} is not under an SD1.5 model prefix")


def _format_names(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMES_IN_ERROR])
    more = len(names) - _MAX_NAMES_IN_ERROR
    return f"{shown}, ... ({more} more)" if more > 0 else shown


def _file_shape(component: str, name: str, model_shape: torch.Size) -> tuple[int, ...]:
    """The shape a model tensor has in an LDM file."""
    if component == "vae" and vae_key_needs_reshape(name):
        return (*model_shape, 1, 1)
    return tuple(model_shape)


def _restore_text_encoder_buffers(text_encoder: CLIPTextModel, device: str | torch.device) -> None:
    """Recreate the non-persistent ``position_ids`` buffer, which is not in files and stays on meta."""
    if text_encoder_is_flat(text_encoder):
        embeddings = text_encoder.embeddings
    else:
        embeddings = text_encoder.text_model.embeddings
    num_positions = embeddings.position_embedding.weight.shape[0]
    embeddings.position_ids = torch.arange(num_positions, device=device).expand((1, -1))


def _check_fully_loaded(component: str, module: torch.nn.Module) -> None:
    for name, tensor in chain(module.named_parameters(), module.named_buffers()):
        if tensor.is_meta:
            raise RuntimeError(f"{component} tensor {name!r} was not loaded (still on the meta device)")


def _group_file_keys(keys: list[str]) -> tuple[dict[str, dict[str, str]], dict[str, list[str]]]:
    """Group file keys: ({component: {diffusers/transformers name: file key}}, {component: unknown keys})."""
    file_keys: dict[str, dict[str, str]] = {name: {} for name in COMPONENT_NAMES}
    unexpected: dict[str, list[str]] = {name: [] for name in COMPONENT_NAMES}
    for key in keys:
        try:
            split = split_checkpoint_key(key)
        except KeyError:
            unexpected[_component_of_key(key)].append(key)
            continue
        if split is None:
            continue
        component, name = split
        if name in file_keys[component]:  # e.g. the same weight with and without `text_model.`
            unexpected[component].append(key)
        else:
            file_keys[component][name] = key
    return file_keys, unexpected


def _match_tensors(
    components: SD15Components, shapes: dict[str, tuple[int, ...]]
) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Pair every model tensor with its file tensor: ({component: {model name: file key}}, problems)."""
    file_keys, unexpected = _group_file_keys(list(shapes))
    sources: dict[str, dict[str, str]] = {}
    problems = []
    for component, module in components.items():
        sources[component] = {}
        remaining = dict(file_keys[component])
        missing = []
        mismatched = []
        for name, model_tensor in module.state_dict().items():
            file_name = text_encoder_transformers_to_ldm(name) if component == "text_encoder" else name
            key = remaining.pop(file_name, None)
            if key is None:
                missing.append(checkpoint_key(component, name))
                continue
            expected_shape = _file_shape(component, name, model_tensor.shape)
            if shapes[key] != expected_shape:
                mismatched.append(f"{key} {list(shapes[key])} (expected {list(expected_shape)})")
                continue
            sources[component][name] = key
        # Names the maps know but this model does not have (e.g. a shortcut conv the widths do not need).
        unexpected[component] += remaining.values()

        for what, names in (("missing", sorted(missing)), ("unexpected", sorted(unexpected[component]))):
            if names:
                problems.append(f"{component}: {len(names)} {what} tensor(s): {_format_names(names)}")
        if mismatched:
            problems.append(f"{component}: {len(mismatched)} shape mismatch(es): {_format_names(mismatched)}")
    return sources, problems


def load_single_file(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> tuple[SD15Components, dict[str, dict[str, str]]]:
    """Load an SD1.5 single-file ``.safetensors`` checkpoint (original LDM layout).

    Configs are inferred from the tensor shapes, modules are created on the meta device (no random
    init) and the file tensors assigned to them, converted with ``tensor.to(dtype)`` (None keeps the
    file's dtype). Keys that are not model weights (EMA copies, schedule buffers, ``position_ids``)
    are ignored; missing, unexpected or mis-shaped weights raise ``ValueError`` naming the file.

    Returns the components and, per component, {model parameter name: file key} (parameter names as the
    model itself spells them, i.e. without ``text_model.`` on transformers >= 5.6).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: only .safetensors single-file checkpoints are supported")

    with safe_open(str(path), framework="pt", device="cpu") as checkpoint:
        shapes = {key: tuple(checkpoint.get_slice(key).get_shape()) for key in checkpoint.keys()}
        return components_from_tensors(shapes, checkpoint.get_tensor, dtype=dtype, device=device, source=str(path))


def components_from_tensors(
    shapes: dict[str, tuple[int, ...]],
    get_tensor: Callable[[str], torch.Tensor],
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    source: str = "the checkpoint",
    copy: bool = True,
) -> tuple[SD15Components, dict[str, dict[str, str]]]:
    """The components of single-file (LDM) tensors: `shapes` {key: shape} and `get_tensor(key)`; see
    :func:`load_single_file`. The modules own their tensors: copies where a tensor would be shared, unless
    `copy=False` (the caller gives its tensors away)."""
    try:
        configs = infer_configs(shapes)
    except KeyError as error:
        raise ValueError(f"{source}: not an SD1.5 checkpoint: {error.args[0]}") from None
    components = build_empty_components(*configs)

    sources, problems = _match_tensors(components, shapes)
    if problems:
        raise ValueError(f"{source}: does not match the SD1.5 layout:\n  " + "\n  ".join(problems))

    for component, module in components.items():
        state_dict = {}
        for name, key in sources[component].items():
            given = get_tensor(key)
            tensor = given.to(dtype) if dtype is not None else given
            if copy and tensor is given and given.device.type == torch.device(device).type:
                # Own the memory: a tensor still backed by a memory-mapped file is copied 4 KiB page by page
                # on its first in-place write (LoRA patching) and breaks if the file is replaced on disk; a
                # tensor of another model (the host's) must not change under it.
                tensor = tensor.clone()
            if component == "vae" and vae_key_needs_reshape(name):
                tensor = tensor.reshape(tensor.shape[0], tensor.shape[1])  # [C, C, 1, 1] conv -> Linear
            state_dict[name] = tensor.to(device)
        module.load_state_dict(state_dict, strict=True, assign=True)

    _restore_text_encoder_buffers(components.text_encoder, device)
    for component, module in components.items():
        _check_fully_loaded(component, module)
        module.eval()
    return components, sources
