"""Independent reference: our patched weights and outputs match diffusers + PEFT on a kohya LoRA."""

import logging

import pytest
import torch

from lora_loom.lora_core.formats import parse_lora
from lora_loom.lora_core.patcher import PatchEngine, PatchEntry
from lora_loom.lora_core.synthetic import random_kohya_lora
from lora_loom.lora_core.targets import kohya_targets
from lora_loom.sd15.keys import text_encoder_is_flat
from lora_loom.sd15.models import build_components

pytest.importorskip("peft")


def diffusers_fused(state, unet_strength, te_strength):
    from lora_loom.sd15.sampling import diffusers_pipeline

    model = build_components("tiny-sd15", seed=0)
    pipe = diffusers_pipeline(model)  # diffusers' own LoRA loader does the work below
    logging.getLogger("transformers").setLevel(logging.ERROR)
    pipe.load_lora_weights(dict(state), adapter_name="kohya")
    pipe.set_adapters(["kohya"], adapter_weights=[{"unet": unet_strength, "text_encoder": te_strength}])
    pipe.fuse_lora(components=["unet", "text_encoder"], adapter_names=["kohya"])
    pipe.unload_lora_weights()  # drops the PEFT layers, keeps the fused weights
    return model


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    if torch.equal(a, b):
        return 0.0
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_kohya_lora_matches_diffusers_fuse():
    ours = build_components("tiny-sd15", seed=0)
    parts = {"unet": ours.unet, "text_encoder": ours.text_encoder}
    state = random_kohya_lora(parts, kohya_targets("all"), rank=4, alpha=1.0, seed=21, scale=0.2)
    PatchEngine(parts).apply([PatchEntry(parse_lora(state, name="kohya"), 0.8, 0.5)])
    reference = diffusers_fused(state, 0.8, 0.5)

    untouched = build_components("tiny-sd15", seed=0)
    for component in ("unet", "text_encoder"):
        ref_state = getattr(reference, component).state_dict()
        base_state = getattr(untouched, component).state_dict()
        changed = 0
        for name, value in getattr(ours, component).state_dict().items():
            assert relative_error(value, ref_state[name]) <= 1e-6, (component, name)
            changed += not torch.equal(ref_state[name], base_state[name])
        assert changed == (192 if component == "unet" else 72)  # diffusers really applied them all

    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    tokens = torch.randint(0, 49408, (2, 77), generator=g)
    with torch.no_grad():
        context = ours.text_encoder(tokens).last_hidden_state
        ref_context = reference.text_encoder(tokens).last_hidden_state
        out = ours.unet(latents, 500, encoder_hidden_states=context).sample
        ref_out = reference.unet(latents, 500, encoder_hidden_states=ref_context).sample
    assert relative_error(context, ref_context) <= 1e-5
    assert relative_error(out, ref_out) <= 1e-5
    assert text_encoder_is_flat(ours.text_encoder) == text_encoder_is_flat(reference.text_encoder)


def transformers_refuses_installed_peft() -> str | None:
    """Why transformers' own PEFT integration (`PreTrainedModel.add_adapter`) would refuse the installed peft."""
    from importlib.metadata import version

    from packaging.version import Version
    from transformers.integrations import peft as transformers_peft

    needed = getattr(transformers_peft, "MIN_PEFT_VERSION", "0")
    if Version(version("peft")) >= Version(needed):
        return None
    return (
        f"transformers {version('transformers')}'s PEFT integration needs peft>={needed}, installed "
        f"{version('peft')}: the reference library's own integration, not our code (requirements.lock pins a "
        "working pair)"
    )


def test_file_saved_by_diffusers_from_a_peft_model_matches_peft_outputs(tmp_path):
    """A LoRA trained the diffusers way (PEFT layers, `save_lora_weights` with metadata) loads exactly."""
    refusal = transformers_refuses_installed_peft()
    if refusal:
        pytest.skip(refusal)
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    peft_model = build_components("tiny-sd15", seed=0)
    unet_config = LoraConfig(
        r=4,
        lora_alpha=8,
        init_lora_weights=False,
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in"],
    )
    te_config = LoraConfig(r=2, lora_alpha=1, init_lora_weights=False, target_modules=["q_proj", "v_proj", "fc1"])
    torch.manual_seed(3)
    peft_model.unet.add_adapter(unet_config)
    peft_model.text_encoder.add_adapter(te_config)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=get_peft_model_state_dict(peft_model.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(peft_model.text_encoder),
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=te_config.to_dict(),
    )

    from lora_loom.lora_core.formats import load_lora

    lora = load_lora(tmp_path)
    assert lora.report.matched == {"unet": 16 * (2 * 4 + 1), "text_encoder": 12 * 3}, lora.report.summary()
    assert not lora.report.not_understood
    ours = build_components("tiny-sd15", seed=0)
    PatchEngine({"unet": ours.unet, "text_encoder": ours.text_encoder}).apply([PatchEntry(lora, 1.0, 1.0)])

    g = torch.Generator().manual_seed(0)
    latents, tokens = torch.randn(1, 4, 8, 8, generator=g), torch.randint(0, 49408, (1, 77), generator=g)
    with torch.no_grad():
        context, ref_context = (m.text_encoder(tokens).last_hidden_state for m in (ours, peft_model))
        out = ours.unet(latents, 10, encoder_hidden_states=context).sample
        ref_out = peft_model.unet(latents, 10, encoder_hidden_states=ref_context).sample  # unmerged PEFT layers
    assert relative_error(context, ref_context) <= 1e-5
    assert relative_error(out, ref_out) <= 1e-5
    assert relative_error(context, build_components("tiny-sd15", seed=0).text_encoder(tokens)[0]) > 1e-3
