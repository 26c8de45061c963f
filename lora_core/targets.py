"""Every name a LoRA file may use for an SD1.5 weight, mapped to one canonical target key.

Canonical targets are `unet.<diffusers module path>` and `text_encoder.text_model.<module path>`.
The module list comes from the SD1.5 key-map topology (`sd15.keys`) and config; the LDM names from the same
key maps, so it covers every Linear and Conv2d of SD1.5 (checked against diffusers' and transformers' own
models in tests/test_targets.py).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from ..sd15 import keys as sd15_keys
from ..sd15.config_files import load_config_dicts

# diffusers' old attention-processor LoRA names (`…attn1.processor.to_q_lora.up.weight`): the
# parser strips `_lora.up.weight`, leaving `…attn1.processor.to_q`.
_ATTN_PROCESSOR_NAMES = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out"}
_TE_ATTN_PROCESSOR_NAMES = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}


# The order diffusers and transformers register these modules in (`named_modules()` order), so lists built
# here match a model's own enumeration (synthetic LoRAs draw their random factors in this order).
_REGISTRATION_ORDER = (
    "conv_in", "time_embedding", "linear_1", "linear_2", "down_blocks", "up_blocks", "mid_block",
    "attentions", "resnets", "downsamplers", "upsamplers", "proj_in", "transformer_blocks", "proj_out",
    "attn1", "conv1", "time_emb_proj", "attn2", "conv2", "conv_shortcut", "ff", "to_q", "to_k", "to_v",
    "to_out", "net", "proj", "conv", "conv_out",
)  # fmt: skip
_TEXT_LAYER_MODULES = (  # CLIPEncoderLayer: self_attn (k, v, q, out), layer_norm1, mlp (fc1, fc2), layer_norm2
    "self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2",
)  # fmt: skip


def _registration_key(path: str) -> tuple[int, ...]:
    return tuple(int(part) if part.isdigit() else _REGISTRATION_ORDER.index(part) for part in path.split("."))


def _is_norm(path: str) -> bool:
    last = path.rsplit(".", 1)[-1]
    return last.startswith("norm") or last == "conv_norm_out"


@functools.cache
def sd15_modules() -> dict[str, list[str]]:
    """Diffusers/transformers names of every Linear and Conv2d of SD1.5 (what a LoRA can target), per
    component, in the models' own order. Built from the key-map topology and SD1.5's shipped config (which
    levels change width, how many text layers): no model is instantiated and diffusers is not imported."""
    unet_config, _, text_config = load_config_dicts("sd15")
    widths = unet_config["block_out_channels"]

    def exists(path: str) -> bool:
        parts = path.split(".")
        if parts[0] == "down_blocks" and parts[-1] == "conv_shortcut":
            level = int(parts[1])
            return widths[level - 1] != widths[level]  # the first resnet of a level that changes width
        return True

    unet = [p for p in sd15_keys.unet_weight_modules() if not _is_norm(p) and exists(p)]
    layers = range(text_config["num_hidden_layers"])
    text = [f"text_model.encoder.layers.{i}.{module}" for i in layers for module in _TEXT_LAYER_MODULES]
    return {"unet": sorted(unet, key=_registration_key), "text_encoder": text}


_UNET_ATTENTION = (".to_q", ".to_k", ".to_v", ".to_out.0")
_UNET_TRANSFORMER_EXTRA = (".ff.net.0.proj", ".ff.net.2", ".proj_in", ".proj_out")
_TE_ATTENTION = (".q_proj", ".k_proj", ".v_proj", ".out_proj")
_TE_MLP = (".fc1", ".fc2")


def kohya_targets(scope: str = "all") -> list[str]:
    """Canonical targets kohya's sd-scripts trains on SD1.5 (also TrainLoRA's `target` choices).

    "all": U-Net Transformer2DModel children (192) + text-encoder attention and MLP (72) = 264.
    "attention": U-Net attn1/attn2 projections (128) + text-encoder self-attention (48) = 176.
    """
    if scope not in ("all", "attention"):
        raise ValueError(f"scope must be 'all' or 'attention', not {scope!r}")
    modules = sd15_modules()
    unet_suffixes = _UNET_ATTENTION + (_UNET_TRANSFORMER_EXTRA if scope == "all" else ())
    te_suffixes = _TE_ATTENTION + (_TE_MLP if scope == "all" else ())
    unet = [f"unet.{n}" for n in modules["unet"] if ".attentions." in n and n.endswith(unet_suffixes)]
    text = [f"text_encoder.{n}" for n in modules["text_encoder"] if n.endswith(te_suffixes)]
    return unet + text


def _unet_aliases(name: str) -> list[str]:
    ldm = sd15_keys.unet_diffusers_to_ldm(name)
    aliases = [
        kohya_name("unet." + name),  # kohya / A1111
        "lora_unet_" + ldm.replace(".", "_"),  # kohya files named after LDM paths
        "lycoris_" + name.replace(".", "_"),  # LyCORIS' own naming of diffusers paths
        "unet." + name,  # diffusers
        name,  # diffusers, unprefixed (older `save_attn_procs`)
        "base_model.model." + name,  # PEFT
        "unet.base_model.model." + name,
        "diffusion_model." + ldm,  # ComfyUI trainer output
        "model.diffusion_model." + ldm,
    ]
    for proj, processor in _ATTN_PROCESSOR_NAMES.items():
        if ".attn" in name and name.endswith("." + proj):
            attention = name[: -len(proj) - 1]
            aliases += [f"{attention}.processor.{processor}", f"unet.{attention}.processor.{processor}"]
    return aliases


def _text_encoder_aliases(name: str) -> list[str]:
    flat = name.removeprefix("text_model.")
    aliases = []
    for spelled in (name, flat):
        underscored = spelled.replace(".", "_")
        aliases += [
            "lora_te_" + underscored,
            "lora_te1_" + underscored,  # diffusers' convert_state_dict_to_kohya, SDXL-style trainers
            "text_encoder." + spelled,
            "text_encoder.base_model.model." + spelled,
            "base_model.model." + spelled,
            spelled,
        ]
    for prefix in ("cond_stage_model.transformer.", "transformer.", "clip_l.transformer."):
        aliases += [prefix + name, "text_encoders." + prefix + name]
    for proj, processor in _TE_ATTN_PROCESSOR_NAMES.items():
        if name.endswith("self_attn." + proj):
            attention = name[: -len(proj) - 1]
            aliases += [f"text_encoder.{attention}.{processor}", f"{attention}.{processor}"]
    return aliases


def kohya_name(target: str) -> str:
    """The kohya / A1111 module name of a canonical target, as kohya's sd-scripts writes it for SD1.5:
    `lora_unet_<diffusers path>`, `lora_te_text_model_<path>` (with `text_model.` whatever transformers
    version wrote it: the spelling every kohya reader maps)."""
    component, path = target.split(".", 1)
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_"}[component]
    return prefix + path.replace(".", "_")


def build_alias_table(spellings: Iterable[tuple[str, list[str]]]) -> dict[str, str]:
    """{alias: target} from (target, its aliases); an alias claimed by two targets is an error (a file
    naming it could not be read unambiguously)."""
    table: dict[str, str] = {}
    for target, aliases in spellings:
        for alias in aliases:
            other = table.setdefault(alias, target)
            if other != target:
                raise ValueError(f"the LoRA module name {alias!r} would name both {other} and {target}")
    return table


@functools.cache
def alias_table() -> dict[str, str]:
    """{any known spelling of a module: canonical target key}; the writer's `kohya_name` is one of them."""
    modules = sd15_modules()
    return build_alias_table(
        [(f"unet.{name}", _unet_aliases(name)) for name in modules["unet"]]
        + [(f"text_encoder.{name}", _text_encoder_aliases(name)) for name in modules["text_encoder"]]
    )
