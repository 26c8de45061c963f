"""Independent reference: our patched weights and outputs match diffusers + PEFT on a kohya LoRA."""

import logging

import pytest
import torch

from lora_loom.lora_core.formats import parse_lora
from lora_loom.lora_core.patcher import PatchEngine, PatchEntry
from lora_loom.lora_core.sd15_models import build_components, text_encoder_is_flat
from lora_loom.lora_core.synthetic import kohya_targets, random_kohya_lora

pytest.importorskip("peft")


def diffusers_fused(state, unet_strength, te_strength):
    from diffusers import StableDiffusionPipeline

    model = build_components("tiny-sd15", seed=0)
    pipe = StableDiffusionPipeline(
        vae=model.vae,
        text_encoder=model.text_encoder,
        tokenizer=None,
        unet=model.unet,
        scheduler=None,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
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
