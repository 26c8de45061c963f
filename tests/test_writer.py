"""`save_lora` writes kohya files that our reader, diffusers' reader and kohya's conventions all agree on."""

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_loom.lora_core.adapters import LoRAAdapter
from lora_loom.lora_core.formats import load_lora, parse_lora
from lora_loom.lora_core.lora import LoadReport, LoRA, target_module
from lora_loom.lora_core.patcher import PatchEngine, PatchEntry
from lora_loom.lora_core.synthetic import random_kohya_lora
from lora_loom.lora_core.targets import alias_table, build_alias_table, kohya_name, kohya_targets, sd15_modules
from lora_loom.lora_core.writer import save_lora

from util import fresh_tiny

CONV_3X3 = "unet.down_blocks.1.resnets.0.conv1"


@pytest.fixture(scope="module")
def mixed_lora(tiny_fp32):
    """Linear, 1×1-conv and 3×3-conv LoRAs, a LoCon Tucker core, one rsLoRA module, two ranks."""
    parts = {"unet": tiny_fp32.unet, "text_encoder": tiny_fp32.text_encoder}
    lora = parse_lora(random_kohya_lora(parts, kohya_targets("all"), rank=4, alpha=2.0, seed=3), name="mixed")
    adapters = dict(lora.adapters)
    weight = target_module(parts, CONV_3X3).weight
    g = torch.Generator().manual_seed(9)
    adapters[CONV_3X3] = LoRAAdapter(
        up=torch.randn(weight.shape[0], 3, 1, 1, generator=g),
        down=torch.randn(3, weight.shape[1], 1, 1, generator=g),
        mid=torch.randn(3, 3, 3, 3, generator=g),
        alpha=1.5,
    )
    rs_target = "text_encoder.text_model.encoder.layers.0.mlp.fc1"
    old = adapters[rs_target]
    adapters[rs_target] = LoRAAdapter(up=old.up, down=old.down, alpha=8.0, rank_scaling="sqrt")
    return LoRA("mixed", adapters, LoadReport("memory"))


def test_every_target_has_one_kohya_name_that_reads_back_to_it():
    table = alias_table()
    modules = sd15_modules()
    targets = [f"unet.{n}" for n in modules["unet"]] + [f"text_encoder.{n}" for n in modules["text_encoder"]]
    names = [kohya_name(t) for t in targets]
    assert len(set(names)) == len(targets) == 282 + 72
    assert all(table[name] == target for name, target in zip(names, targets, strict=True))
    assert all(name.startswith("lora_te_text_model_") for name in names if "lora_te" in name)


def test_the_name_table_refuses_a_name_claimed_by_two_modules():
    with pytest.raises(ValueError, match="would name both unet.a and unet.b"):
        build_alias_table([("unet.a", ["x", "y"]), ("unet.b", ["z", "x"])])


def test_save_and_load_round_trip_exactly(mixed_lora, tmp_path):
    path = save_lora(mixed_lora, tmp_path / "mixed.safetensors")
    loaded = load_lora(path)
    assert loaded.adapters.keys() == mixed_lora.adapters.keys()
    assert loaded.report.formats == ["kohya"] and not loaded.report.not_understood
    for target, adapter in mixed_lora.adapters.items():
        back = loaded.adapters[target]
        for mine, theirs in zip(adapter.tensors(), back.tensors(), strict=True):
            assert torch.equal(mine, theirs), target
        assert back.scale == pytest.approx(adapter.scale, rel=1e-7), target  # rsLoRA: alpha' = alpha·√r
    assert loaded.fingerprint == mixed_lora.fingerprint  # the same tensors, so the same LoRA to the engine


def test_half_precision_factors_with_float32_alphas(mixed_lora, tmp_path):
    path = save_lora(mixed_lora, tmp_path / "half.safetensors", dtype=torch.float16)
    state = load_file(path)
    assert {t.dtype for k, t in state.items() if not k.endswith(".alpha")} == {torch.float16}
    assert {t.dtype for k, t in state.items() if k.endswith(".alpha")} == {torch.float32}
    assert all(t.ndim == 0 for k, t in state.items() if k.endswith(".alpha"))


def test_metadata_is_kohyas_strings_and_the_hash_is_a1111s(mixed_lora, tmp_path):
    tags = json.dumps({"10_toy": {"trigger": 3, "circle": 2}})
    path = save_lora(mixed_lora, tmp_path / "m.safetensors", metadata={"ss_steps": 100, "ss_tag_frequency": tags})
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert all(isinstance(v, str) for v in metadata.values())
    assert metadata["ss_steps"] == "100" and json.loads(metadata["ss_tag_frequency"]) == json.loads(tags)
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata["ss_network_dim"] == "Dynamic" and metadata["ss_output_name"] == "mixed"  # ranks 4 and 3
    # A1111 modules/hashes.py: sha256 of the file after the 8-byte length and the JSON header.
    raw = path.read_bytes()
    assert metadata["sshs_model_hash"] == hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little") :]).hexdigest()
    assert len(metadata["sshs_legacy_hash"]) == 8


def test_uniform_rank_and_alpha_are_written_as_numbers(tiny_fp32, tmp_path):
    parts = {"unet": tiny_fp32.unet, "text_encoder": tiny_fp32.text_encoder}
    lora = parse_lora(random_kohya_lora(parts, kohya_targets("attention"), rank=8, alpha=4.0, seed=1), name="u")
    with safe_open(str(save_lora(lora, tmp_path / "u.safetensors")), framework="pt") as f:
        metadata = f.metadata()
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("8", "4")


def test_unknown_style_is_refused(mixed_lora, tmp_path):
    with pytest.raises(ValueError, match="style must be one of kohya"):
        save_lora(mixed_lora, tmp_path / "x.safetensors", style="peft")
    assert not list(tmp_path.iterdir())


def test_diffusers_reads_our_file_to_the_weights_our_engine_patches(tiny_fp32, tmp_path):
    """Independent reader: diffusers' `load_lora_weights` + `fuse_lora` on the file we wrote."""
    from test_reference_diffusers import diffusers_fused, relative_error

    parts = {"unet": tiny_fp32.unet, "text_encoder": tiny_fp32.text_encoder}
    lora = parse_lora(random_kohya_lora(parts, kohya_targets("all"), rank=4, alpha=1.0, seed=21, scale=0.2))
    path = save_lora(lora, tmp_path / "ours.safetensors")
    reference = diffusers_fused(load_file(path), 0.8, 0.5)
    ours = fresh_tiny()
    PatchEngine({"unet": ours.unet, "text_encoder": ours.text_encoder}).apply([PatchEntry(load_lora(path), 0.8, 0.5)])
    untouched = fresh_tiny()
    for component in ("unet", "text_encoder"):
        theirs, base = getattr(reference, component).state_dict(), getattr(untouched, component).state_dict()
        changed = 0
        for name, value in getattr(ours, component).state_dict().items():
            assert relative_error(value, theirs[name]) <= 1e-6, (component, name)
            changed += not torch.equal(theirs[name], base[name])
        assert changed == (192 if component == "unet" else 72)  # diffusers applied every module we wrote
