"""Our LoRAs on ComfyUI's own MODEL and CLIP: patches for the host's ModelPatcher, computed by our engine.

The host patches a weight by calling each patch's `calculate_weight` on a float32 copy of W0 and rounding the
result to the weight's dtype. Our patch object does what our engine's `write_patched` does (one float32 addmm of
η·up @ down onto W0), so the host's patched weights are our engine's, bit for bit — for every file format
LoadLoRA reads, including those the host's own LoraLoader maps wrongly or not at all. The patch keeps only the
LoRA's factors; the host keeps its own backup of W0, as for its own LoRAs.

Imports ComfyUI only inside the functions that run in the host.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

from ..lora_core.adapters import WeightAdapter
from ..lora_core.adapters.base import AdapterError
from ..lora_core.lora import LoRA, component_of
from ..sd15.keys import HOST_TEXT_ENCODER_PREFIX, HOST_UNET_PREFIX, host_weight_key

# Our component names → the node input that carries the host's model of it.
HOST_INPUTS = {"unet": "model", "text_encoder": "clip"}


def host_patches(lora: LoRA, component: str) -> dict[str, WeightAdapter]:
    """{host weight name: adapter} for one component ("unet" or "text_encoder") of `lora`."""
    return {host_weight_key(t): a for t, a in sorted(lora.adapters.items()) if component_of(t) == component}


def check_fits(patches: Mapping[str, WeightAdapter], weights: Mapping, lora_name: str, component: str) -> None:
    """Raise ValueError, naming the LoRA and the modules, unless every patch has a weight it fits in `weights`
    (the host model's state dict). The host itself would skip such keys without a word."""
    where = f"ApplyLoRAToModel: LoRA {lora_name!r} on the {HOST_INPUTS[component]} input"
    missing = [key for key in patches if key not in weights]
    if missing:
        raise ValueError(
            f"{where}: {len(missing)} of its {len(patches)} modules are not in this model "
            f"(e.g. {', '.join(missing[:3])}); is it an SD1.5 model? Nothing was patched."
        )
    for key, adapter in patches.items():
        try:
            adapter.check(weights[key].shape)
        except AdapterError as error:
            raise ValueError(
                f"{where}: {key}: {error}; a LoRA for another architecture? Nothing was patched."
            ) from None


@functools.cache
def host_patch_class() -> type:
    """Our patch as a subclass of the host's `WeightAdapterBase` (made on first use, inside the host)."""
    import torch
    from comfy.weight_adapter.base import WeightAdapterBase

    from ..lora_core.delta import write_patched

    class LoomPatch(WeightAdapterBase):
        name = "lora_loom"

        def __init__(self, adapter: WeightAdapter) -> None:
            self.adapter = adapter
            self.loaded_keys = set()
            self.weights = adapter.tensors()

        def calculate_weight(
            self,
            weight,
            key,
            strength,
            strength_model,
            offset,
            function,
            intermediate_dtype=torch.float32,
            original_weight=None,
        ):
            contributions = [(self.adapter, float(strength))]
            if function is None and weight.is_contiguous():
                # Our engine's own arithmetic: W0 + η·up @ down summed in float32, rounded once to the dtype.
                write_patched(weight, weight, contributions)
                return weight
            # A host patch function, or a narrowed weight: the same delta, handed through the function.
            delta = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            write_patched(delta, delta, contributions)
            weight += (function(delta) if function is not None else delta).to(weight.dtype)
            return weight

    return LoomPatch


def apply_lora_to_model(model, clip, lora: LoRA, strength_model: float, strength_clip: float):
    """(MODEL, CLIP) clones with `lora` added as host patches at these strengths; the inputs stay as they are."""
    patch_class = host_patch_class()
    results = []
    for component, patcher, strength in (("unet", model, strength_model), ("text_encoder", clip, strength_clip)):
        patches = host_patches(lora, component)
        if patcher is None or strength == 0 or not patches:
            results.append(patcher)
            continue
        # CLIP wraps its ModelPatcher; the host's LoraLoader goes through the same clone/add_patches calls.
        weights = (patcher.patcher if component == "text_encoder" else patcher).model.state_dict()
        check_fits(patches, weights, lora.name, component)
        clone = patcher.clone()
        clone.add_patches({key: patch_class(adapter) for key, adapter in patches.items()}, strength)
        results.append(clone)
    return tuple(results)


def _host_model_config(state_dict: Mapping, text_encoder_config: dict):
    """The host's model config for these weights: its own SD15 where its detection knows them (full-size
    SD1.5); else SD15 with our widths and a CLIP of our text encoder's config (e.g. the toy-world base)."""
    import comfy.model_detection
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.supported_models_base

    prefix = "model.diffusion_model."
    unet_config = comfy.model_detection.detect_unet_config(state_dict, prefix)
    if unet_config is None:
        raise ValueError("LoomToComfy: ComfyUI does not recognise this base's U-Net")
    # The host's own matching (model_config_from_unet_config), without its error log for widths it lacks.
    for candidate in comfy.supported_models.models:
        if candidate.matches(unet_config, state_dict):
            if issubclass(candidate, comfy.supported_models.SD15):
                return candidate(unet_config)
            break
    # The host pools at the end token; our configs may carry transformers' placeholder id.
    clip_config = {**text_encoder_config, "eos_token_id": 49407}

    class LoomClipModel(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006 (the host's signature)
            super().__init__(
                device=device,
                textmodel_json_config=clip_config,
                return_projected_pooled=False,
                dtype=dtype,
                model_options=model_options,
            )

    class LoomSD15(comfy.supported_models.SD15):
        def clip_target(self, state_dict={}):  # noqa: B006 (the host's signature)
            target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
            target.params["clip_model"] = LoomClipModel
            return target

    return LoomSD15(unet_config)


def _vae_config(vae_config: Mapping) -> dict:
    """The host's AutoencoderKL parameters for our (diffusers) VAE config."""
    widths = list(vae_config["block_out_channels"])
    ddconfig = {
        "double_z": True,
        "z_channels": vae_config["latent_channels"],
        "resolution": vae_config.get("sample_size", 256),
        "in_channels": vae_config["in_channels"],
        "out_ch": vae_config["out_channels"],
        "ch": widths[0],
        "ch_mult": [w // widths[0] for w in widths],
        "num_res_blocks": vae_config["layers_per_block"],
        "attn_resolutions": [],
        "dropout": 0.0,
    }
    return {"params": {"ddconfig": ddconfig, "embed_dim": vae_config["latent_channels"]}}


def _share_into(module, state_dict: Mapping, what: str, ignore: tuple[str, ...] = ()) -> None:
    """Give a host module our tensors without a copy: each of its parameters becomes a new Parameter over our
    storage (`assign=True`), so the host's `.to()` and patching never reach our modules' own Parameters."""
    missing, _ = module.load_state_dict(state_dict, strict=False, assign=True)
    missing = [key for key in missing if not key.endswith(ignore)]
    missing += [name for name, tensor in [*module.named_parameters(), *module.named_buffers()] if tensor.is_meta]
    if missing:
        raise ValueError(f"LoomToComfy: the host's {what} lacks {len(missing)} weights, e.g. {missing[:3]}")


def loom_to_comfy(base):
    """(MODEL, CLIP, VAE): the handle's weights now (its fused and applied LoRAs in) as the host's own objects.

    The host's objects hold the very tensors of our model, not copies (one set of weights in memory); our
    engine's later writes to them are copy-on-write (`PatchEngine.share_weights`), so the MODEL and CLIP keep
    this handle's state whatever other branches of the graph apply afterwards.
    """
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import torch

    from ..sd15.models import components_state_dict_ldm

    components, device = base.model.components, base.model.device
    with base.model.lock:  # the shared weights hold this handle's state while the host takes them
        base.activate()
        state_dict = components_state_dict_ldm(components)
        config = _host_model_config(state_dict, components.text_encoder.config.to_dict())
        config.set_inference_dtype(base.model.dtype, None)
        prefix = "model.diffusion_model."
        # The host's own loader builds the model where its weights are, then loads them; we assign ours instead.
        model = config.get_model(state_dict, prefix, device=device)
        unet_state = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        _share_into(model.diffusion_model, config.process_unet_state_dict(unet_state), "U-Net")
        patcher = comfy.model_patcher.ModelPatcher(
            model,
            load_device=comfy.model_management.get_torch_device(),
            offload_device=comfy.model_management.unet_offload_device(),
        )
        clip_state = config.process_clip_state_dict(dict(state_dict))
        clip = comfy.sd.CLIP(
            config.clip_target(state_dict=clip_state),
            tokenizer_data=clip_state,
            model_options={"dtype": base.model.dtype},  # the host's default would be fp16 on the CPU too
        )
        _share_into(clip.cond_stage_model, clip_state, "CLIP", ignore=(".logit_scale", ".text_projection.weight"))
        vae_state = {
            k[len("first_stage_model.") :]: v for k, v in state_dict.items() if k.startswith("first_stage_model.")
        }
        # The host's VAE copies the weights it is built with: built on the meta device from placeholders it
        # allocates nothing, then takes ours (converted where its working dtype is not the base's).
        with torch.device("meta"):
            vae = comfy.sd.VAE(
                sd={k: v.to("meta") for k, v in vae_state.items()}, config=_vae_config(components.vae.config)
            )
        _share_into(vae.first_stage_model, {k: v.to(vae.vae_dtype) for k, v in vae_state.items()}, "VAE")
        base.model.engine.share_weights()
    if device.type != "cpu":  # as the host's own loader does for a model it built on the GPU
        comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    return patcher, clip, vae


def _patched_states(model, clip) -> tuple[dict, dict]:
    """Copies of the U-Net's and the text encoder's weights with their patches (LoRAs loaded by any node) in, got
    the way the host's own CheckpointSave gets them: both loaded with their patches forced into the weights."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model, clip.load_model()], force_patch_weights=True)
    copies = ({k: t.detach().clone() for k, t in m.state_dict().items()} for m in (model.model, clip.cond_stage_model))
    return tuple(copies)


def comfy_to_loom(model, clip, vae, name: str = "ComfyUI model"):
    """An SD_BASE of the host's MODEL, CLIP and VAE of an SD1.5 checkpoint (their patches applied), with weights
    of its own: TrainLoRA and our engine then work on a model the host loaded or merged."""
    import comfy.model_management

    from ..lora_core.patcher import PatchEngine
    from ..sd15.base import LoadedModel, SDBase
    from ..sd15.keys import TEXT_ENCODER_PREFIX, UNET_PREFIX, VAE_PREFIX
    from ..sd15.models import components_from_tensors

    tensors = {}
    unet_state, clip_state = _patched_states(model, clip)
    for key, tensor in unet_state.items():
        if key.startswith(HOST_UNET_PREFIX):
            tensors[UNET_PREFIX + key[len(HOST_UNET_PREFIX) :]] = tensor
    for key, tensor in clip_state.items():
        if key.startswith(HOST_TEXT_ENCODER_PREFIX + "text_model."):
            tensors[TEXT_ENCODER_PREFIX + key[len(HOST_TEXT_ENCODER_PREFIX) :]] = tensor
    for key, tensor in vae.first_stage_model.state_dict().items():
        tensors[VAE_PREFIX + key] = tensor.detach().clone()
    dtype, device = model.model.get_dtype(), comfy.model_management.get_torch_device()
    shapes = {key: tuple(tensor.shape) for key, tensor in tensors.items()}
    try:
        components, _ = components_from_tensors(
            shapes, tensors.pop, dtype=dtype, device=device, source="ComfyToLoom", copy=False
        )
    except ValueError as error:
        raise ValueError(f"{error} (is it an SD1.5 model?)") from None
    engine = PatchEngine({"unet": components.unet, "text_encoder": components.text_encoder})
    return (SDBase(LoadedModel(name, components, engine, dtype, device)),)
