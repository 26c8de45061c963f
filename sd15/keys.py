"""Explicit SD1.5 name maps between the original (LDM) layout and diffusers / transformers names.

A single-file SD1.5 checkpoint stores three models under three prefixes:

- the U-Net under ``model.diffusion_model.`` (``input_blocks`` / ``middle_block`` / ``output_blocks``),
- the VAE under ``first_stage_model.`` (``encoder.down`` / ``decoder.up`` / ``mid``),
- the CLIP text encoder under ``cond_stage_model.transformer.`` (``text_model.`` + transformers names).

The U-Net and VAE maps are written as small topology data (4 levels, layers per block, which levels carry
attention) from which every module path and tensor key is enumerated once at import time. Both module
paths (``input_blocks.1.1.proj_in``) and tensor keys (``input_blocks.1.1.proj_in.weight``) are accepted;
names are given without the component prefix. Unknown names raise ``KeyError``.

Text encoder names: transformers < 5.6 spells ``CLIPTextModel`` names ``text_model.encoder.layers...``;
transformers >= 5.6 flattened the model (``encoder.layers...``). Checkpoint files always use the
``text_model.`` spelling, so that is the spelling this module returns unless asked for ``flat`` names.

Pure string functions: nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."

COMPONENT_NAMES = ("unet", "vae", "text_encoder")

_WEIGHT_AND_BIAS = ("weight", "bias")


@dataclass(frozen=True)
class _Layer:
    """One module inside a block: its LDM and diffusers sub-paths and the parameters it owns."""

    ldm: str
    diffusers: str
    params: tuple[str, ...] = _WEIGHT_AND_BIAS


# A block root (a resnet, a transformer, a down/upsampler) maps to a block root; it owns no parameters.
_ROOT = _Layer("", "", ())
# A block that is a single parameter-carrying module (conv_in, time_embed.0, ...).
_LEAF = (_Layer("", ""),)

# ---------------------------------------------------------------------------------------------------------
# U-Net
# ---------------------------------------------------------------------------------------------------------

# SD1.5 U-Net topology (diffusers config: block_out_channels has 4 entries, layers_per_block = 2).
_UNET_LEVELS = 4
_UNET_LAYERS_PER_DOWN_BLOCK = 2
_UNET_LAYERS_PER_UP_BLOCK = 3  # layers_per_block + 1: up blocks also consume the skip of the downsampler
_UNET_DOWN_HAS_ATTENTION = (True, True, True, False)  # CrossAttnDownBlock2D x3, DownBlock2D
_UNET_UP_HAS_ATTENTION = (False, True, True, True)  # UpBlock2D, CrossAttnUpBlock2D x3

_UNET_RESNET = (
    _ROOT,
    _Layer("in_layers.0", "norm1"),
    _Layer("in_layers.2", "conv1"),
    _Layer("emb_layers.1", "time_emb_proj"),
    _Layer("out_layers.0", "norm2"),
    _Layer("out_layers.3", "conv2"),
)
# Resnets whose channel count can change also have a 1x1 shortcut conv (present only when it does change).
_UNET_RESNET_WITH_SHORTCUT = _UNET_RESNET + (_Layer("skip_connection", "conv_shortcut"),)

# The spatial transformer (Transformer2DModel in diffusers) has the same names on both sides.
_TRANSFORMER_MODULES = (
    "norm",
    "proj_in",
    "proj_out",
    "transformer_blocks.0.norm1",
    "transformer_blocks.0.norm2",
    "transformer_blocks.0.norm3",
    "transformer_blocks.0.attn1.to_out.0",
    "transformer_blocks.0.attn2.to_out.0",
    "transformer_blocks.0.ff.net.0.proj",
    "transformer_blocks.0.ff.net.2",
)
_TRANSFORMER_BIAS_FREE_MODULES = tuple(
    f"transformer_blocks.0.{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v")
)
_TRANSFORMER_CONTAINERS = (
    "transformer_blocks",
    "transformer_blocks.0",
    "transformer_blocks.0.attn1",
    "transformer_blocks.0.attn1.to_out",
    "transformer_blocks.0.attn2",
    "transformer_blocks.0.attn2.to_out",
    "transformer_blocks.0.ff",
    "transformer_blocks.0.ff.net",
    "transformer_blocks.0.ff.net.0",
)
_UNET_TRANSFORMER = (
    (_ROOT,)
    + tuple(_Layer(name, name, ()) for name in _TRANSFORMER_CONTAINERS)
    + tuple(_Layer(name, name) for name in _TRANSFORMER_MODULES)
    + tuple(_Layer(name, name, ("weight",)) for name in _TRANSFORMER_BIAS_FREE_MODULES)
)

_UNET_DOWNSAMPLER = (_ROOT, _Layer("op", "conv"))
_UNET_UPSAMPLER = (_ROOT, _Layer("conv", "conv"))


def _unet_blocks() -> list[tuple[str, str, tuple[_Layer, ...]]]:
    """(LDM block path, diffusers block path, layers) for every block of the SD1.5 U-Net."""
    blocks = [
        ("time_embed", "time_embedding", (_ROOT,)),
        ("time_embed.0", "time_embedding.linear_1", _LEAF),
        ("time_embed.2", "time_embedding.linear_2", _LEAF),
        ("input_blocks.0.0", "conv_in", _LEAF),
        ("out.0", "conv_norm_out", _LEAF),
        ("out.2", "conv_out", _LEAF),
    ]

    # input_blocks.{i}: i = 0 is conv_in; then per level `layers` (resnet [+ attention]) and a downsampler.
    input_index = 1
    for level in range(_UNET_LEVELS):
        for layer in range(_UNET_LAYERS_PER_DOWN_BLOCK):
            can_change_channels = level > 0 and layer == 0
            resnet = _UNET_RESNET_WITH_SHORTCUT if can_change_channels else _UNET_RESNET
            blocks.append((f"input_blocks.{input_index}.0", f"down_blocks.{level}.resnets.{layer}", resnet))
            if _UNET_DOWN_HAS_ATTENTION[level]:
                blocks.append(
                    (
                        f"input_blocks.{input_index}.1",
                        f"down_blocks.{level}.attentions.{layer}",
                        _UNET_TRANSFORMER,
                    )
                )
            input_index += 1
        if level < _UNET_LEVELS - 1:
            blocks.append((f"input_blocks.{input_index}.0", f"down_blocks.{level}.downsamplers.0", _UNET_DOWNSAMPLER))
            input_index += 1

    blocks += [
        ("middle_block.0", "mid_block.resnets.0", _UNET_RESNET),
        ("middle_block.1", "mid_block.attentions.0", _UNET_TRANSFORMER),
        ("middle_block.2", "mid_block.resnets.1", _UNET_RESNET),
    ]

    # output_blocks.{i}: resnet [+ attention] per layer; the last layer of every level but the last one
    # also holds the upsampler, right after the attention if there is one (index 2), else at index 1.
    output_index = 0
    for level in range(_UNET_LEVELS):
        has_attention = _UNET_UP_HAS_ATTENTION[level]
        for layer in range(_UNET_LAYERS_PER_UP_BLOCK):
            # Every up resnet takes a concatenated skip connection, so its channel count always changes.
            blocks.append(
                (
                    f"output_blocks.{output_index}.0",
                    f"up_blocks.{level}.resnets.{layer}",
                    _UNET_RESNET_WITH_SHORTCUT,
                )
            )
            if has_attention:
                blocks.append(
                    (
                        f"output_blocks.{output_index}.1",
                        f"up_blocks.{level}.attentions.{layer}",
                        _UNET_TRANSFORMER,
                    )
                )
            is_last_layer = layer == _UNET_LAYERS_PER_UP_BLOCK - 1
            if is_last_layer and level < _UNET_LEVELS - 1:
                upsampler_index = 2 if has_attention else 1
                blocks.append(
                    (
                        f"output_blocks.{output_index}.{upsampler_index}",
                        f"up_blocks.{level}.upsamplers.0",
                        _UNET_UPSAMPLER,
                    )
                )
            output_index += 1
    return blocks


# ---------------------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------------------

_VAE_LEVELS = 4
_VAE_LAYERS_PER_ENCODER_BLOCK = 2
_VAE_LAYERS_PER_DECODER_BLOCK = 3

_VAE_RESNET = (
    _ROOT,
    _Layer("norm1", "norm1"),
    _Layer("conv1", "conv1"),
    _Layer("norm2", "norm2"),
    _Layer("conv2", "conv2"),
)
_VAE_RESNET_WITH_SHORTCUT = _VAE_RESNET + (_Layer("nin_shortcut", "conv_shortcut"),)
# LDM's AttnBlock uses 1x1 convs for q/k/v/proj_out; diffusers' Attention uses Linear layers.
_VAE_ATTENTION = (
    _ROOT,
    _Layer("norm", "group_norm"),
    _Layer("q", "to_q"),
    _Layer("k", "to_k"),
    _Layer("v", "to_v"),
    _Layer("proj_out", "to_out.0"),
)
_VAE_DOWNSAMPLER = (_ROOT, _Layer("conv", "conv"))
_VAE_UPSAMPLER = (_ROOT, _Layer("conv", "conv"))

# VAE attention weights (diffusers names): [C, C, 1, 1] convs in LDM files, [C, C] Linear in diffusers.
VAE_ATTENTION_CONV_KEYS = frozenset(
    f"{part}.mid_block.attentions.0.{proj}.weight"
    for part in ("encoder", "decoder")
    for proj in ("to_q", "to_k", "to_v", "to_out.0")
)


def vae_key_needs_reshape(diffusers_key: str) -> bool:
    """True for VAE attention weights: [C, C, 1, 1] in LDM files, [C, C] in diffusers' AutoencoderKL."""
    return diffusers_key in VAE_ATTENTION_CONV_KEYS


def _vae_blocks() -> list[tuple[str, str, tuple[_Layer, ...]]]:
    """(LDM block path, diffusers block path, layers) for every block of the SD1.5 VAE."""
    blocks = [
        ("quant_conv", "quant_conv", _LEAF),
        ("post_quant_conv", "post_quant_conv", _LEAF),
    ]
    for part in ("encoder", "decoder"):
        blocks += [
            (f"{part}.conv_in", f"{part}.conv_in", _LEAF),
            (f"{part}.conv_out", f"{part}.conv_out", _LEAF),
            (f"{part}.norm_out", f"{part}.conv_norm_out", _LEAF),
            (f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", _VAE_RESNET),
            (f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", _VAE_ATTENTION),
            (f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", _VAE_RESNET),
        ]

    # Encoder: encoder.down.{i} <-> encoder.down_blocks.{i}; every level but the last downsamples.
    for level in range(_VAE_LEVELS):
        for layer in range(_VAE_LAYERS_PER_ENCODER_BLOCK):
            can_change_channels = level > 0 and layer == 0
            resnet = _VAE_RESNET_WITH_SHORTCUT if can_change_channels else _VAE_RESNET
            blocks.append(
                (
                    f"encoder.down.{level}.block.{layer}",
                    f"encoder.down_blocks.{level}.resnets.{layer}",
                    resnet,
                )
            )
        if level < _VAE_LEVELS - 1:
            blocks.append(
                (
                    f"encoder.down.{level}.downsample",
                    f"encoder.down_blocks.{level}.downsamplers.0",
                    _VAE_DOWNSAMPLER,
                )
            )

    # Decoder: LDM numbers levels from the highest resolution, diffusers in execution order, so
    # decoder.up.{i} <-> decoder.up_blocks.{3 - i}; every block but the last one (up.0) upsamples.
    for ldm_level in range(_VAE_LEVELS):
        level = _VAE_LEVELS - 1 - ldm_level
        for layer in range(_VAE_LAYERS_PER_DECODER_BLOCK):
            can_change_channels = level > 0 and layer == 0
            resnet = _VAE_RESNET_WITH_SHORTCUT if can_change_channels else _VAE_RESNET
            blocks.append(
                (
                    f"decoder.up.{ldm_level}.block.{layer}",
                    f"decoder.up_blocks.{level}.resnets.{layer}",
                    resnet,
                )
            )
        if ldm_level > 0:
            blocks.append(
                (
                    f"decoder.up.{ldm_level}.upsample",
                    f"decoder.up_blocks.{level}.upsamplers.0",
                    _VAE_UPSAMPLER,
                )
            )
    return blocks


# ---------------------------------------------------------------------------------------------------------
# Enumerated maps
# ---------------------------------------------------------------------------------------------------------


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if name else prefix


def _enumerate_names(blocks: list[tuple[str, str, tuple[_Layer, ...]]]) -> list[tuple[str, str]]:
    """Every (LDM name, diffusers name) pair of the blocks: module paths and their tensor keys."""
    pairs = []
    for ldm_block, diffusers_block, layers in blocks:
        for layer in layers:
            ldm_path = _join(ldm_block, layer.ldm)
            diffusers_path = _join(diffusers_block, layer.diffusers)
            pairs.append((ldm_path, diffusers_path))
            for param in layer.params:
                pairs.append((f"{ldm_path}.{param}", f"{diffusers_path}.{param}"))
    return pairs


def _build_maps(pairs: list[tuple[str, str]]) -> tuple[dict[str, str], dict[str, str]]:
    """Both directions of a one-to-one name map; fails loudly if the topology data is not one-to-one."""
    forward: dict[str, str] = {}
    backward: dict[str, str] = {}
    for ldm_name, diffusers_name in pairs:
        if ldm_name in forward or diffusers_name in backward:
            raise AssertionError(f"duplicate SD1.5 name in key map: {ldm_name!r} / {diffusers_name!r}")
        forward[ldm_name] = diffusers_name
        backward[diffusers_name] = ldm_name
    return forward, backward


_UNET_LDM_TO_DIFFUSERS, _UNET_DIFFUSERS_TO_LDM = _build_maps(_enumerate_names(_unet_blocks()))
_VAE_LDM_TO_DIFFUSERS, _VAE_DIFFUSERS_TO_LDM = _build_maps(_enumerate_names(_vae_blocks()))


def _lookup(table: dict[str, str], name: str, what: str, example: str, prefix: str) -> str:
    try:
        return table[name]
    except KeyError:
        hint = f" (give it without the {prefix!r} prefix)" if prefix and name.startswith(prefix) else ""
        message = f"unknown SD1.5 {what} name {name!r}{hint}"
        raise KeyError(f"{message}; expected a module path or tensor key such as {example!r}") from None


def unet_ldm_to_diffusers(name: str) -> str:
    """U-Net module path or tensor key, LDM -> diffusers.

    ``input_blocks.1.1.proj_in`` -> ``down_blocks.0.attentions.0.proj_in``,
    ``input_blocks.1.0.in_layers.0.weight`` -> ``down_blocks.0.resnets.0.norm1.weight``.
    """
    return _lookup(_UNET_LDM_TO_DIFFUSERS, name, "U-Net LDM", "input_blocks.1.1.proj_in.weight", UNET_PREFIX)


def unet_diffusers_to_ldm(name: str) -> str:
    """U-Net module path or tensor key, diffusers -> LDM (inverse of :func:`unet_ldm_to_diffusers`)."""
    return _lookup(_UNET_DIFFUSERS_TO_LDM, name, "U-Net diffusers", "down_blocks.0.attentions.0.proj_in.weight", "")


def unet_weight_modules() -> list[str]:
    """diffusers paths of every U-Net module that owns a weight in some SD1.5-topology model (a shortcut conv
    exists only where a level changes width, so a particular model may lack a few of these)."""
    return [key.removesuffix(".weight") for key in _UNET_DIFFUSERS_TO_LDM if key.endswith(".weight")]


def vae_ldm_to_diffusers(name: str) -> str:
    """VAE module path or tensor key, LDM -> diffusers.

    ``decoder.up.0.block.0.nin_shortcut`` -> ``decoder.up_blocks.3.resnets.0.conv_shortcut``,
    ``encoder.mid.attn_1.q.weight`` -> ``encoder.mid_block.attentions.0.to_q.weight`` (see
    :func:`vae_key_needs_reshape` for the shape difference).
    """
    return _lookup(_VAE_LDM_TO_DIFFUSERS, name, "VAE LDM", "encoder.mid.attn_1.q.weight", VAE_PREFIX)


def vae_diffusers_to_ldm(name: str) -> str:
    """VAE module path or tensor key, diffusers -> LDM (inverse of :func:`vae_ldm_to_diffusers`)."""
    return _lookup(_VAE_DIFFUSERS_TO_LDM, name, "VAE diffusers", "encoder.mid_block.attentions.0.to_q.weight", "")


# ---------------------------------------------------------------------------------------------------------
# CLIP text encoder
# ---------------------------------------------------------------------------------------------------------

_TEXT_MODEL = "text_model."
_TEXT_LAYERS = "encoder.layers."

# Module -> parameters, below `text_model.` (containers own none).
_TEXT_TOP_MODULES = {
    "embeddings": (),
    "embeddings.token_embedding": ("weight",),
    "embeddings.position_embedding": ("weight",),
    "encoder": (),
    "encoder.layers": (),
    "final_layer_norm": _WEIGHT_AND_BIAS,
}
# Module -> parameters, below `text_model.encoder.layers.{n}.` ("" is the layer itself).
_TEXT_LAYER_MODULES = {
    "": (),
    "self_attn": (),
    "self_attn.q_proj": _WEIGHT_AND_BIAS,
    "self_attn.k_proj": _WEIGHT_AND_BIAS,
    "self_attn.v_proj": _WEIGHT_AND_BIAS,
    "self_attn.out_proj": _WEIGHT_AND_BIAS,
    "layer_norm1": _WEIGHT_AND_BIAS,
    "layer_norm2": _WEIGHT_AND_BIAS,
    "mlp": (),
    "mlp.fc1": _WEIGHT_AND_BIAS,
    "mlp.fc2": _WEIGHT_AND_BIAS,
}


def _module_and_tensor_names(modules: dict[str, tuple[str, ...]]) -> frozenset[str]:
    names = set()
    for module, params in modules.items():
        names.add(module)
        names.update(_join(module, param) for param in params)
    return frozenset(names)


_TEXT_TOP_NAMES = _module_and_tensor_names(_TEXT_TOP_MODULES)
_TEXT_LAYER_NAMES = _module_and_tensor_names(_TEXT_LAYER_MODULES)


def _is_text_encoder_name(name: str) -> bool:
    """Whether ``name`` (below ``text_model.``) is a CLIPTextModel module path or tensor key."""
    if name in _TEXT_TOP_NAMES:
        return True
    if not name.startswith(_TEXT_LAYERS):
        return False
    index, _, rest = name[len(_TEXT_LAYERS) :].partition(".")
    if not index.isdigit() or name.endswith("."):
        return False
    return rest in _TEXT_LAYER_NAMES


def _unknown_text_encoder_name(name: str) -> KeyError:
    hint = f" (give it without the {TEXT_ENCODER_PREFIX!r} prefix)" if name.startswith(TEXT_ENCODER_PREFIX) else ""
    return KeyError(
        f"unknown SD1.5 text encoder name {name!r}{hint}; expected a module path or tensor key such as "
        "'text_model.encoder.layers.0.self_attn.q_proj.weight'"
    )


def text_encoder_is_flat(text_encoder: object) -> bool:
    """True if a CLIPTextModel has no ``text_model`` level (transformers >= 5.6 flattened it)."""
    return not hasattr(text_encoder, "text_model")


def text_encoder_ldm_to_transformers(name: str, flat: bool) -> str:
    """Text encoder name, checkpoint spelling (``text_model.…``) -> the CLIPTextModel's own spelling.

    ``flat=True`` for transformers >= 5.6 (no ``text_model.`` level), ``False`` for older versions.
    """
    if not name.startswith(_TEXT_MODEL) or not _is_text_encoder_name(name[len(_TEXT_MODEL) :]):
        raise _unknown_text_encoder_name(name)
    return name[len(_TEXT_MODEL) :] if flat else name


def text_encoder_transformers_to_ldm(name: str) -> str:
    """Text encoder name, either transformers spelling -> checkpoint spelling (``text_model.…``)."""
    relative = name[len(_TEXT_MODEL) :] if name.startswith(_TEXT_MODEL) else name
    if not _is_text_encoder_name(relative):
        raise _unknown_text_encoder_name(name)
    return _TEXT_MODEL + relative


# ---------------------------------------------------------------------------------------------------------
# Full checkpoint keys
# ---------------------------------------------------------------------------------------------------------

# Tensors some checkpoints carry under a model prefix that are not model parameters.
_IGNORED_TEXT_ENCODER_KEYS = frozenset({"text_model.embeddings.position_ids"})


def _require_tensor_key(key: str, name: str) -> None:
    if name.rsplit(".", 1)[-1] not in _WEIGHT_AND_BIAS:
        raise KeyError(f"{key!r} is not an SD1.5 tensor key (expected a name ending in .weight or .bias)")


def split_checkpoint_key(key: str) -> tuple[str, str] | None:
    """Full LDM tensor key -> (component, diffusers/transformers key), or None for keys loaders ignore.

    The component is "unet", "vae" or "text_encoder"; text encoder keys keep the ``text_model.`` spelling.
    Keys outside the three model prefixes (``model_ema.*``, ``alphas_cumprod``, ``betas``, ...) and the
    ``position_ids`` buffer give None. Unknown names under a model prefix raise ``KeyError``.
    """
    if key.startswith(UNET_PREFIX):
        name = key[len(UNET_PREFIX) :]
        _require_tensor_key(key, name)
        return "unet", unet_ldm_to_diffusers(name)
    if key.startswith(VAE_PREFIX):
        name = key[len(VAE_PREFIX) :]
        _require_tensor_key(key, name)
        return "vae", vae_ldm_to_diffusers(name)
    if key.startswith(TEXT_ENCODER_PREFIX):
        name = key[len(TEXT_ENCODER_PREFIX) :]
        if not name.startswith(_TEXT_MODEL):
            # Very old checkpoints (transformers < 4.x CLIP) omit the `text_model.` level.
            name = _TEXT_MODEL + name
        if name in _IGNORED_TEXT_ENCODER_KEYS:
            return None
        _require_tensor_key(key, name)
        return "text_encoder", text_encoder_transformers_to_ldm(name)
    return None


def checkpoint_key(component: str, key: str) -> str:
    """(component, diffusers/transformers key) -> full LDM tensor key (inverse of split_checkpoint_key).

    Text encoder keys may use either transformers spelling; the result always has ``text_model.``.
    """
    if component == "unet":
        return UNET_PREFIX + unet_diffusers_to_ldm(key)
    if component == "vae":
        return VAE_PREFIX + vae_diffusers_to_ldm(key)
    if component == "text_encoder":
        return TEXT_ENCODER_PREFIX + text_encoder_transformers_to_ldm(key)
    raise ValueError(f"unknown SD1.5 component {component!r}; expected one of {COMPONENT_NAMES}")


# ---------------------------------------------------------------------------------------------------------
# ComfyUI's own names
# ---------------------------------------------------------------------------------------------------------

# ComfyUI keeps SD1.5's U-Net in `BaseModel` (state-dict names `diffusion_model.<LDM path>`) and its text
# encoder in `SD1ClipModel` (`clip_l.transformer.text_model.…`): the checkpoint's names less `model.`, and
# with `clip_l.` for `cond_stage_model.`. Its ModelPatcher patches are keyed by these names.
HOST_UNET_PREFIX = "diffusion_model."
HOST_TEXT_ENCODER_PREFIX = "clip_l.transformer."


def host_weight_key(target: str) -> str:
    """A canonical LoRA target (``unet.<diffusers module>``, ``text_encoder.text_model.<module>``) -> the name
    of the weight it patches in ComfyUI's SD1.5 model objects."""
    component, module = target.split(".", 1)
    if component == "unet":
        return HOST_UNET_PREFIX + unet_diffusers_to_ldm(module + ".weight")
    if component == "text_encoder":
        return HOST_TEXT_ENCODER_PREFIX + text_encoder_transformers_to_ldm(module + ".weight")
    raise ValueError(f"{target!r} is not a U-Net or text-encoder LoRA target")
