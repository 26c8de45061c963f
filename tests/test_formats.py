"""Every LoRA flavour in the wild parses to the same canonical adapters, with an honest report."""

import json

import pytest
import torch
from safetensors.torch import save_file

from lora_loom.lora_core.formats import LoRAFormatError, load_lora, parse_lora
from lora_loom.lora_core.synthetic import random_kohya_lora
from lora_loom.lora_core.targets import kohya_name, kohya_targets
from lora_loom.sd15 import keys as sd15_keys

from util import attention_processor_state, make_lora, peft_state_for_kohya_converter


@pytest.fixture(scope="module")
def kohya_state(tiny_fp32):
    parts = {"unet": tiny_fp32.unet, "text_encoder": tiny_fp32.text_encoder}
    targets = kohya_targets("all") + ["unet.down_blocks.1.resnets.0.conv1", "unet.mid_block.resnets.1.conv2"]
    return random_kohya_lora(parts, targets, rank=4, alpha=2.0, seed=3)


def rename(state, new_module_name, up="lora_up.weight", down="lora_down.weight", alpha="alpha"):
    """Re-spell a kohya state dict's module names and tensor suffixes."""
    renamed = {}
    for key, tensor in state.items():
        module, suffix = key.split(".", 1)
        suffix = {"lora_up.weight": up, "lora_down.weight": down, "alpha": alpha}[suffix]
        if suffix is not None:
            renamed[f"{new_module_name(module)}.{suffix}"] = tensor
    return renamed


def assert_same_adapters(a, b):
    assert a.adapters.keys() == b.adapters.keys()
    for key in a.adapters:
        x, y = a.adapters[key], b.adapters[key]
        assert torch.equal(x.up.flatten(1), y.up.flatten(1)) and torch.equal(x.down.flatten(1), y.down.flatten(1))
        assert x.scale == y.scale, key


def test_kohya_counts_and_alpha(kohya_state):
    lora = parse_lora(kohya_state, source="k.safetensors")
    assert lora.components() == {"unet": 194, "text_encoder": 72}
    assert lora.report.matched == {"unet": 194, "text_encoder": 72}
    assert lora.report.formats == ["kohya"] and not lora.report.not_understood
    assert all(adapter.scale == 2.0 / 4 for adapter in lora.adapters.values())
    assert lora.adapters["unet.down_blocks.0.attentions.0.proj_in"].down.ndim == 4  # 1x1 conv in SD1.5


def test_missing_alpha_means_alpha_equals_rank(kohya_state):
    no_alpha = {k: v for k, v in kohya_state.items() if not k.endswith(".alpha")}
    assert all(adapter.scale == 1.0 for adapter in parse_lora(no_alpha).adapters.values())


def test_all_spellings_give_the_same_lora(kohya_state):
    """Every spelling parses to the same adapters. The names here are made with our key maps (a consistency
    check); that they are the names other tools write is checked against those tools' own output in
    test_comfyui_files.py (ComfyUI's key map + diffusers' converter) and in the diffusers-converter test below."""
    reference = parse_lora(kohya_state)
    by_kohya = {kohya_name(t): t for t in reference.adapters}

    def ldm_kohya(module):
        target = by_kohya[module]
        if target.startswith("unet."):
            return "lora_unet_" + sd15_keys.unet_diffusers_to_ldm(target[5:]).replace(".", "_")
        return module

    def comfy_trainer(module):
        target = by_kohya[module]
        if target.startswith("unet."):
            return "diffusion_model." + sd15_keys.unet_diffusers_to_ldm(target[5:])
        return "text_encoders.clip_l.transformer." + target.removeprefix("text_encoder.")

    def diffusers_peft(module):
        return by_kohya[module]  # unet.<path> / text_encoder.text_model.<path>

    def diffusers_flat_te(module):
        return by_kohya[module].replace("text_encoder.text_model.", "text_encoder.")

    def peft_base_model(module):
        target = by_kohya[module]
        return target.replace("unet.", "unet.base_model.model.", 1).replace(
            "text_encoder.", "text_encoder.base_model.model.", 1
        )

    spellings = {
        "ldm-named kohya": rename(kohya_state, ldm_kohya),
        "comfyui": rename(kohya_state, comfy_trainer),
        "diffusers lora.up": rename(kohya_state, diffusers_peft, "lora.up.weight", "lora.down.weight"),
        "diffusers linear layer": rename(
            kohya_state, diffusers_flat_te, "lora_linear_layer.up.weight", "lora_linear_layer.down.weight"
        ),
        "peft": rename(kohya_state, peft_base_model, "lora_B.weight", "lora_A.weight"),
    }
    for label, state in spellings.items():
        parsed = parse_lora(state)
        assert not parsed.report.not_understood, (label, parsed.report.summary())
        assert_same_adapters(parsed, reference)


def test_old_attention_processor_names(kohya_state):
    state = attention_processor_state(parse_lora(kohya_state))
    parsed = parse_lora(state)
    assert parsed.components() == {"unet": 128, "text_encoder": 0}
    assert parsed.report.formats == ["diffusers-attn-processor"]


def test_peft_alpha_from_diffusers_metadata(kohya_state, tmp_path):
    state = rename(kohya_state, lambda m: m, "lora_B.weight", "lora_A.weight", alpha=None)
    by_kohya = {kohya_name(t): t for t in parse_lora(kohya_state).adapters}
    state = {by_kohya[k.split(".")[0]] + "." + k.split(".", 1)[1]: v for k, v in state.items()}
    metadata = {
        "lora_adapter_metadata": json.dumps(
            {
                "unet.lora_alpha": 8,
                "unet.r": 4,
                "text_encoder.lora_alpha": 2,
                "text_encoder.r": 4,
                "unet.alpha_pattern": {"proj_in": 1},
            }
        )
    }
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(state, str(path), metadata=metadata)
    lora = load_lora(tmp_path)
    assert lora.adapters["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"].scale == 2.0
    assert lora.adapters["unet.down_blocks.0.attentions.0.proj_in"].scale == 0.25
    assert lora.adapters["text_encoder.text_model.encoder.layers.0.mlp.fc1"].scale == 0.5
    assert "metadata" in lora.report.summary()


def test_unknown_keys_are_grouped_not_listed(kohya_state):
    state = dict(kohya_state)
    for i in range(40):
        state[f"lora_te2_text_model_encoder_layers_{i}_mlp_fc1.lora_up.weight"] = torch.zeros(1, 1)
    lora = parse_lora(state)
    assert lora.report.not_understood_count == 40
    assert list(lora.report.not_understood) == ["lora_te2_text_model_encoder_layers_*…"]
    assert len(lora.report.summary().splitlines()) == 2


def test_wrong_architecture_is_a_clear_error():
    sdxl = {
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(4, 4),
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_up.weight": torch.zeros(4, 4),
    }
    with pytest.raises(LoRAFormatError, match=r"sdxl\.safetensors: no tensor matches.*SDXL"):
        parse_lora(sdxl, source="sdxl.safetensors")


def test_nan_and_corrupt_files_name_the_file(kohya_state, tmp_path):
    bad = dict(kohya_state)
    key = next(k for k in bad if k.endswith("lora_up.weight"))
    bad[key] = bad[key].clone()
    bad[key][0, 0] = float("nan")
    save_file(bad, str(tmp_path / "nan.safetensors"))
    with pytest.raises(LoRAFormatError, match=r"nan\.safetensors: .* up contains NaN"):
        load_lora(tmp_path / "nan.safetensors")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(LoRAFormatError, match=r"corrupt\.safetensors: not a readable LoRA file"):
        load_lora(tmp_path / "corrupt.safetensors")
    with pytest.raises(LoRAFormatError, match="no such LoRA file"):
        load_lora(tmp_path / "missing.safetensors")


def test_fp16_file_round_trip(tiny_fp32, tmp_path):
    lora = make_lora(tiny_fp32, seed=4)
    state = {
        k: v.half()
        for k, v in random_kohya_lora(
            {"unet": tiny_fp32.unet, "text_encoder": tiny_fp32.text_encoder}, kohya_targets(), seed=4
        ).items()
    }
    save_file(state, str(tmp_path / "half.safetensors"))
    loaded = load_lora(tmp_path / "half.safetensors")
    assert loaded.name == "half" and loaded.components() == lora.components()
    assert next(iter(loaded.adapters.values())).up.dtype == torch.float16


def test_locon_tucker_mid_and_pickled_files(tiny_fp32, tmp_path):
    conv = "lora_unet_down_blocks_1_resnets_0_conv1"  # 3x3 conv, 64 -> 64 in the tiny model
    state = {
        f"{conv}.lora_down.weight": torch.randn(2, 32, 1, 1),
        f"{conv}.lora_mid.weight": torch.randn(2, 2, 3, 3),
        f"{conv}.lora_up.weight": torch.randn(64, 2, 1, 1),
        f"{conv}.alpha": torch.tensor(1.0),
    }
    torch.save(state, tmp_path / "locon.pt")
    lora = load_lora(tmp_path / "locon.pt")
    adapter = lora.adapters["unet.down_blocks.1.resnets.0.conv1"]
    assert adapter.mid is not None and adapter.scale == 0.5
    adapter.check(tiny_fp32.unet.down_blocks[1].resnets[0].conv1.weight.shape)

    torch.save({"not": "tensors", "code": print}, tmp_path / "evil.ckpt")  # unpickling code is refused
    with pytest.raises(LoRAFormatError, match=r"evil\.ckpt: not a readable LoRA file"):
        load_lora(tmp_path / "evil.ckpt")


def test_diffusers_convert_state_dict_to_kohya_output_reads_to_the_peft_factors(tiny_fp32):
    """Written by diffusers' own converter (PEFT → kohya, as A1111/ComfyUI exporters use it), not re-spelled by us.
    Under transformers ≥ 5.6 it writes `lora_te1_encoder_layers_…` (no `text_model.`); both spellings read."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    peft_state = peft_state_for_kohya_converter()
    kohya = convert_state_dict_to_kohya(peft_state)
    assert any(k.startswith("lora_te1_") for k in kohya) and any(k.startswith("lora_unet_") for k in kohya)

    lora = parse_lora(kohya, source="diffusers-kohya")
    assert not lora.report.not_understood, lora.report.summary()
    assert lora.report.matched == {"unet": 16 * 4, "text_encoder": 12 * 2}  # to_q ×2, proj_in, ff.net.2 per block
    for key, tensor in peft_state.items():
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0].replace("text_encoder.", "text_encoder.text_model.", 1)
        module = module.replace("text_model.text_model.", "text_model.")  # transformers < 5.6 already has it
        adapter = lora.adapters[module]
        assert torch.equal(adapter.down.flatten(1), tensor.flatten(1)), module
        assert torch.equal(adapter.up.flatten(1), peft_state[key.replace(".lora_A.", ".lora_B.")].flatten(1))
        assert adapter.scale == 1.0  # the converter writes alpha = rank
