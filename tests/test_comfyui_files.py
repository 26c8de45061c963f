"""LoRA names and files as ComfyUI itself writes and reads them (fixtures made by the real host, see
tests/data/comfyui/README.md), against our reader.

The module each name patches comes from two independent sources: ComfyUI's own LoRA key map (which checkpoint
tensor a LoRA key patches) and diffusers' own single-file converter (which diffusers/transformers module that
checkpoint tensor becomes). Neither goes through our key maps.
"""

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm, load_single_file_checkpoint
from safetensors.torch import load_file
from transformers import CLIPTextModel

from lora_loom.lora_core.formats import load_lora
from lora_loom.lora_core.patcher import PatchEngine, PatchEntry
from lora_loom.lora_core.targets import alias_table
from lora_loom.sd15.base import built_in_tiny_checkpoint
from lora_loom.sd15.config_files import config_dir
from lora_loom.sd15.keys import host_weight_key
from lora_loom.sd15.models import load_single_file

FIXTURES = Path(__file__).parent / "data" / "comfyui"
KEY_MAP = json.loads((FIXTURES / "comfyui_lora_key_map.json").read_text())


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().float().contiguous().numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def target_of_checkpoint_key() -> dict[str, str]:
    """{single-file checkpoint key: canonical target}, by matching diffusers' converted weights to the file's
    tensors by value (random weights: every tensor is unique)."""
    path = str(built_in_tiny_checkpoint())
    config = str(config_dir("tiny-sd15"))
    unet = UNet2DConditionModel.from_single_file(path, config=config, subfolder="unet", local_files_only=True)
    checkpoint = load_single_file_checkpoint(path, local_files_only=True)
    text = create_diffusers_clip_model_from_ldm(
        CLIPTextModel, checkpoint, subfolder="text_encoder", config=config, local_files_only=True
    )
    keys_of = {}
    for key, tensor in load_file(path).items():
        if key.endswith(".weight") and tensor.ndim >= 2:
            keys_of.setdefault(_digest(tensor), []).append(key)
    found = {}
    flat = not hasattr(text, "text_model")  # transformers >= 5.6; canonical targets keep `text_model.`
    for component, model in (("unet", unet), ("text_encoder", text)):
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and "text_projection" not in name:
                keys = keys_of[_digest(module.weight)]
                assert len(keys) == 1, (name, keys)
                path_name = f"text_model.{name}" if component == "text_encoder" and flat else name
                found[keys[0]] = f"{component}.{path_name}"
    return found


def checkpoint_key(comfy_key: str) -> str:
    """ComfyUI's model key → the single-file checkpoint key it was loaded from."""
    if comfy_key.startswith("diffusion_model."):
        return "model." + comfy_key
    return comfy_key.replace("clip_l.transformer.", "cond_stage_model.transformer.", 1)


def family(lora_key: str) -> str:
    for prefix in ("lora_unet_", "lora_te1_", "lora_te_", "lycoris_", "unet.", "diffusion_model.", "text_encoders."):
        if lora_key.startswith(prefix):
            return prefix
    return "text_encoder." if lora_key.startswith("text_encoder.") else "diffusers (unprefixed)"


def test_every_name_comfyui_maps_to_a_linear_or_conv_we_map_to_the_same_module(target_of_checkpoint_key):
    table = alias_table()
    checked, ours_only_missing = Counter(), Counter()
    for part in ("unet", "clip"):
        for lora_key, comfy_key in KEY_MAP[part].items():
            expected = target_of_checkpoint_key.get(checkpoint_key(comfy_key))
            ours = table.get(lora_key)
            if expected is None:
                # Norm weights, biases, embeddings, SDXL-only names: no LoRA-targetable module of SD1.5.
                assert ours is None, (lora_key, comfy_key, ours)
                continue
            if ours is None:
                ours_only_missing[family(lora_key)] += 1
                continue
            assert ours == expected, (lora_key, comfy_key)
            checked[family(lora_key)] += 1
    assert not ours_only_missing, f"names ComfyUI reads and we don't: {dict(ours_only_missing)}"
    # Every family ComfyUI knows was exercised, on all 264 kohya modules and every U-Net Linear/Conv.
    assert checked["lora_te_"] == checked["lora_te1_"] == 72
    assert checked["lora_unet_"] >= 2 * 192 and checked["diffusion_model."] >= 192
    assert {"lycoris_", "unet.", "text_encoder.", "text_encoders.", "diffusers (unprefixed)"} <= set(checked)


@pytest.fixture(scope="module")
def comfy_trained():
    return load_lora(FIXTURES / "comfyui_trained_lora.safetensors")


def test_comfyui_trainer_file_patches_what_comfyui_computes(comfy_trained):
    """ComfyUI's LoRA math (comfy/weight_adapter/lora.py): W + α/r · (up.flatten(1) @ down.flatten(1)) reshaped
    to W — its conv LoRAs are stored 2-D ([r, in·kh·kw]); every Linear and Conv of the U-Net, 282 modules."""
    path = built_in_tiny_checkpoint()
    state = load_file(FIXTURES / "comfyui_trained_lora.safetensors")
    model, _ = load_single_file(path)
    original = {k: v.clone() for k, v in model.unet.state_dict().items()}
    engine = PatchEngine({"unet": model.unet, "text_encoder": model.text_encoder})
    engine.apply([PatchEntry(comfy_trained, 0.7, 1.0)])

    assert comfy_trained.report.matched == {"unet": 282}
    ldm_to_target = {}
    for key in state:
        if key.endswith(".lora_up.weight"):
            ldm_to_target[key.removesuffix(".lora_up.weight")] = alias_table()[key.removesuffix(".lora_up.weight")]
    assert len(ldm_to_target) == 282
    for module, target in ldm_to_target.items():
        _, name, live = engine.parameter(target)
        up, down = state[f"{module}.lora_up.weight"].double(), state[f"{module}.lora_down.weight"].double()
        scale = float(state[f"{module}.alpha"]) / down.shape[0]
        w0 = original[name].double()
        expected = w0 + 0.7 * scale * (up.flatten(1) @ down.flatten(1)).reshape(w0.shape)
        torch.testing.assert_close(live.double(), expected, rtol=1e-6, atol=1e-7, msg=target)


def test_comfyui_trainer_diff_and_bias_deltas_are_reported_not_dropped_silently(comfy_trained):
    """ComfyUI's trainer also writes `diff` (norm weights) and `diff_b` (biases) deltas, which ComfyUI applies and
    we do not yet: the load report must say so, every one of them."""
    state = load_file(FIXTURES / "comfyui_trained_lora.safetensors")
    extra = {key for key in state if key.endswith((".diff", ".diff_b"))}
    assert len(extra) == 404
    assert {key for keys in comfy_trained.report.not_understood.values() for key in keys} == extra


def test_the_names_our_writer_uses_are_names_comfyui_reads_to_the_same_module(target_of_checkpoint_key):
    from lora_loom.lora_core.targets import kohya_name, sd15_modules

    target_of = {**KEY_MAP["unet"], **KEY_MAP["clip"]}
    modules = sd15_modules()
    for target in [f"unet.{n}" for n in modules["unet"]] + [f"text_encoder.{n}" for n in modules["text_encoder"]]:
        comfy_key = target_of.get(kohya_name(target))
        assert comfy_key is not None, kohya_name(target)
        assert target_of_checkpoint_key[checkpoint_key(comfy_key)] == target


def test_host_weight_key_names_the_weight_comfyui_keeps_for_every_lora_target(target_of_checkpoint_key):
    """ApplyLoRAToModel keys its ModelPatcher patches by `host_weight_key`: each must be the name ComfyUI's own
    model objects give that module's weight (a value of its key map) and come from the checkpoint tensor that
    diffusers' converter loads into the target."""
    host_names = {*KEY_MAP["unet"].values(), *KEY_MAP["clip"].values()}
    assert len(target_of_checkpoint_key) > 250
    for key, target in target_of_checkpoint_key.items():
        host_key = host_weight_key(target)
        assert host_key in host_names, (target, host_key)
        assert checkpoint_key(host_key) == key, target


def test_apply_lora_to_model_refuses_a_lora_the_hosts_model_cannot_take(tiny_fp32):
    """ApplyLoRAToModel checks every patch against the host model's weights before it patches (the host's
    add_patches would drop a key it lacks without a word): missing modules and wrong shapes name the LoRA."""
    from lora_loom.nodes.comfy_bridge import check_fits, host_patches

    from util import make_lora

    lora = make_lora(tiny_fp32, seed=2, name="tiny-lora")
    patches = host_patches(lora, "unet")
    assert len(patches) == lora.components()["unet"] and set(patches) <= set(KEY_MAP["unet"].values())
    shapes = {}
    for component, model in (("unet", tiny_fp32.unet), ("text_encoder", tiny_fp32.text_encoder)):
        for target in lora.adapters:
            if target.startswith(component + "."):
                module = model.get_submodule(target.split(".", 1)[1].removeprefix("text_model."))
                shapes[host_weight_key(target)] = module.weight
    check_fits(patches, shapes, lora.name, "unet")  # the tiny model it was made for: fits
    wider = {key: torch.empty(t.shape[0] * 2, *t.shape[1:]) for key, t in shapes.items()}
    with pytest.raises(ValueError, match=r"LoRA 'tiny-lora' on the model input: diffusion_model\..*another arch"):
        check_fits(patches, wider, lora.name, "unet")
    without_one = dict(list(shapes.items())[1:])
    with pytest.raises(ValueError, match=r"LoRA 'tiny-lora' on the (model|clip) input: 1 of its .* not in this model"):
        check_fits(host_patches(lora, "unet") | host_patches(lora, "text_encoder"), without_one, lora.name, "unet")
