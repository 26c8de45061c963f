"""Every name a LoRA file may use for an SD1.5 weight, mapped to one canonical target key.

Canonical targets are `unet.<diffusers module path>` and `text_encoder.text_model.<module path>`.
The table is built from the model classes' own module names (instantiated on the meta device),
and the LDM names come from the SD1.5 key maps, so it covers every Linear and Conv2d of SD1.5.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
from torch import nn

from ..sd15 import keys as sd15_keys
from ..sd15.keys import text_encoder_is_flat
from ..sd15.models import config_dir

# diffusers' old attention-processor LoRA names (`…attn1.processor.to_q_lora.up.weight`): the
# parser strips `_lora.up.weight`, leaving `…attn1.processor.to_q`.
_ATTN_PROCESSOR_NAMES = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out"}
_TE_ATTN_PROCESSOR_NAMES = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}


def _linear_and_conv_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))]


@functools.cache
def sd15_modules() -> dict[str, list[str]]:
    """Diffusers/transformers names of every LoRA-targetable module of SD1.5, per component."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = config_dir("tiny-sd15")  # same topology and names as full SD1.5, cheap to build
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet"))
        text = CLIPTextModel(CLIPTextConfig.from_json_file(configs / "text_encoder" / "config.json"))
    text_names = _linear_and_conv_names(text)
    if text_encoder_is_flat(text):  # transformers >= 5.6: canonical keys keep `text_model.`
        text_names = [f"text_model.{name}" for name in text_names]
    return {
        "unet": _linear_and_conv_names(unet),
        "text_encoder": [n for n in text_names if "text_model." in n],
    }


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
