"""The LoRA-targetable module list, built from our topology tables, is the models' own (diffusers/transformers)."""

import subprocess
import sys

import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from lora_loom.lora_core.targets import sd15_modules
from lora_loom.sd15.config_files import config_dir
from lora_loom.sd15.keys import text_encoder_is_flat


def linear_and_conv_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


@pytest.mark.parametrize("config", ["sd15", "tiny-sd15", "toy-world-sd15"])
def test_the_module_list_is_what_diffusers_and_transformers_build_in_their_order(config):
    folder = config_dir(config)
    with torch.device("meta"):  # full-size SD1.5 too: no memory on the meta device
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        text = CLIPTextModel(CLIPTextConfig.from_json_file(folder / "text_encoder" / "config.json"))
    text_names = linear_and_conv_names(text)
    if text_encoder_is_flat(text):
        text_names = [f"text_model.{name}" for name in text_names]
    ours = sd15_modules()
    assert ours["unet"] == linear_and_conv_names(unet)  # same names, same order
    assert ours["text_encoder"] == [n for n in text_names if "text_model.encoder." in n]
    assert (len(ours["unet"]), len(ours["text_encoder"])) == (282, 72)


def test_reading_loras_imports_neither_diffusers_nor_transformers():
    code = (
        "import sys, lora_loom.lora_core.formats as f; f.alias_table(); "
        "print(sorted(m for m in ('diffusers', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
