"""What each node does: thin calls into lora_core. Inputs arrive by the names in `contract.py`."""

from __future__ import annotations

import logging

from .paths import BUILT_IN_BASES, folder_of, in_host, model_path, save_path
from .progress import step_progress

log = logging.getLogger("lora_loom")


def _device():
    if in_host():
        import comfy.model_management  # only inside ComfyUI

        return comfy.model_management.get_torch_device()
    return None  # lora_core picks cuda when available, else cpu


def load_base(ckpt_name: str, dtype: str = "auto"):
    from ..sd15.base import load_base as core_load_base

    if ckpt_name in BUILT_IN_BASES:
        source = ckpt_name
    else:
        source = model_path("checkpoints", ckpt_name)
        if source is None:
            raise FileNotFoundError(f"LoadBase: checkpoint {ckpt_name!r} not found in {folder_of('checkpoints')}")
    return (core_load_base(source, dtype=dtype, device=_device()),)


def load_lora(lora_name: str):
    from ..lora_core.formats import load_lora as core_load_lora

    path = model_path("loras", lora_name)
    if path is None:
        raise FileNotFoundError(f"LoadLoRA: LoRA {lora_name!r} not found in {folder_of('loras')}")
    lora = core_load_lora(path, name=lora_name)
    lora.report.source = lora_name  # the report reaches the browser: no server paths in it
    summary = lora.report.summary()
    log.info("LoadLoRA: %s", summary)
    return {"ui": {"text": [summary]}, "result": (lora,)}


def apply_lora(base, lora, strength_unet: float = 1.0, strength_text_encoder: float = 1.0):
    applied = base.with_lora(lora, strength_unet, strength_text_encoder)
    applied.model.engine.check(applied.patches[-1:])  # wrong architecture fails here, at this node
    return (applied,)


def fuse_lora(base, save_name: str = "", save_fp16: bool = False):
    import torch

    fused = base.fused_base()
    if not save_name.strip():
        return (fused,)
    name = save_name.strip()
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    fused.save(save_path("checkpoints", name), dtype=torch.float16 if save_fp16 else None)
    log.info("FuseLoRA: saved %s", name)
    return {"ui": {"text": [f"saved checkpoints/{name}"]}, "result": (fused,)}


def sampler(base, prompt, negative_prompt, seed, steps, cfg, sampler_name, scheduler, width, height, batch_size):
    from ..sd15.sampling import sample

    update, close = step_progress(steps, "Sampler")
    try:
        result = sample(
            base,
            prompt,
            negative_prompt,
            seed=seed,
            steps=steps,
            cfg=cfg,
            sampler_name=sampler_name,
            scheduler=scheduler,
            width=width,
            height=height,
            batch_size=batch_size,
            progress=update,
        )
    finally:
        close()
    return (result.images, {"samples": result.latents})


def image_grid(row_1, row_labels: str = "", upscale: int = 2, **more_rows):
    from ..sd15.grid import image_grid as core_image_grid
    from ..sd15.images import to_image_batch

    rows = [row_1] + [more_rows[name] for name in sorted(more_rows) if more_rows[name] is not None]
    labels = [line.strip() for line in row_labels.splitlines()]
    return (to_image_batch(core_image_grid(rows, row_labels=labels, upscale=upscale)),)


def file_fingerprint(kind: str, name: str) -> str:
    """IS_CHANGED for loaders: a file replaced under the same name is loaded again."""
    if name in BUILT_IN_BASES:
        return name
    path = model_path(kind, name)
    if path is None:
        return "missing"
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


CHANGE_CHECKS = {
    "LoadBase": lambda ckpt_name, dtype="auto", **_: file_fingerprint("checkpoints", ckpt_name),
    "LoadLoRA": lambda lora_name, **_: file_fingerprint("loras", lora_name),
}

IMPLEMENTATIONS = {
    "LoadBase": load_base,
    "LoadLoRA": load_lora,
    "ApplyLoRA": apply_lora,
    "FuseLoRA": fuse_lora,
    "Sampler": sampler,
    "LoomImageGrid": image_grid,
}
