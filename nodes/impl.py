"""What each node does: thin calls into lora_core. Inputs arrive by the names in `contract.py`."""

from __future__ import annotations

import logging
import os

from .paths import BUILT_IN_BASES, dataset_folder, folder_of, in_host, model_path, save_path
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


def apply_lora_to_model(model, clip, lora, strength_model: float = 1.0, strength_clip: float = 1.0):
    from .comfy_bridge import apply_lora_to_model as bridge_apply

    return bridge_apply(model, clip, lora, strength_model, strength_clip)


def loom_to_comfy(base):
    from .comfy_bridge import loom_to_comfy as bridge_loom_to_comfy

    return bridge_loom_to_comfy(base)


def comfy_to_loom(model, clip, vae):
    from .comfy_bridge import comfy_to_loom as bridge_comfy_to_loom

    return bridge_comfy_to_loom(model, clip, vae)


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


def _checked_output_name(output_name: str) -> str:
    """The LoRA's file name: a plain name in the loras folder — no folders, no `..`, nothing absolute."""
    name = output_name.strip()
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    problem = None
    if not name:
        problem = "is empty"
    elif "/" in name or "\\" in name or os.sep in name or "\x00" in name:
        problem = "contains a path separator (files go into the loras folder itself)"
    elif name in (".", "..") or name.startswith(".."):
        problem = "leaves the loras folder"
    elif os.path.isabs(name) or (len(name) > 1 and name[1] == ":"):
        problem = "is an absolute path"
    if problem:
        raise ValueError(f"TrainLoRA: output_name {output_name!r} {problem}; nothing was written")
    return name


def _settings(**values):
    from ..training.settings import SettingsError, TrainSettings

    try:
        return TrainSettings(**values)
    except SettingsError as error:
        raise SettingsError(f"TrainLoRA: {error}") from None


def _host_messages(unique_id: str | None):
    """Inside the host: (should_stop, send(step info) as a `lora_loom.train` message). Headless: (None, no-op)."""
    if not in_host():
        return None, (lambda info: None)
    import comfy.model_management  # only inside ComfyUI
    from server import PromptServer

    from .web_routes import record_train_message

    def send(info) -> None:
        message = {"node": unique_id, "step": info.step, "total": info.total, "loss": info.loss}
        message.update(loss_ema=info.loss_ema, lr=info.lr, eta_s=info.eta_s)
        message["prompt_id"] = getattr(PromptServer.instance, "last_prompt_id", None)  # which queued run
        record_train_message(message)
        PromptServer.instance.send_sync("lora_loom.train", message)

    return comfy.model_management.processing_interrupted, send


def train_lora(base, dataset_dir: str, caption_prefix: str, rank: int, alpha: float, steps: int,
               learning_rate: float, text_encoder_lr: float, batch_size: int, resolution: int, seed: int,
               train_text_encoder: bool, target: str, optimizer: str, lr_scheduler: str, warmup_steps: int,
               min_snr_gamma: float, noise_offset: float, gradient_checkpointing: bool, mixed_precision: str,
               save_every_n_steps: int, output_name: str, use_rslora: bool = False, validation_prompt: str = "",
               validation_every_n_steps: int = 0, unique_id: str | None = None):  # fmt: skip
    import time

    from PIL import Image

    from ..sd15.images import to_image_batch
    from ..training.dataset import DatasetError, scan_dataset
    from ..training.loss_chart import loss_chart
    from ..training.trainer import TrainingInterrupted
    from ..training.trainer import train_lora as core_train_lora

    name = _checked_output_name(output_name)
    settings = _settings(
        rank=rank, alpha=alpha, steps=steps, learning_rate=learning_rate,
        text_encoder_lr=text_encoder_lr, batch_size=batch_size, resolution=resolution, seed=seed,
        train_text_encoder=train_text_encoder, target=target, optimizer=optimizer, lr_scheduler=lr_scheduler,
        warmup_steps=warmup_steps, min_snr_gamma=min_snr_gamma, noise_offset=noise_offset,
        gradient_checkpointing=gradient_checkpointing, mixed_precision=mixed_precision,
        save_every_n_steps=save_every_n_steps, use_rslora=use_rslora, validation_prompt=validation_prompt,
        validation_every_n_steps=validation_every_n_steps,
    )  # fmt: skip
    try:
        dataset = scan_dataset(dataset_folder(dataset_dir), resolution=resolution, caption_prefix=caption_prefix)
    except DatasetError as error:
        raise DatasetError(f"TrainLoRA: dataset_dir {dataset_dir!r}: {error}") from None
    output = save_path("loras", f"{name}.safetensors")
    should_stop, send = _host_messages(unique_id)
    update, close = step_progress(steps, "TrainLoRA")
    losses: list[float] = []
    shown_at = [0.0]

    def progress(info) -> None:
        losses.append(info.loss)
        send(info)
        picture = None
        if in_host() and time.monotonic() - shown_at[0] > 5:  # a preview image every few seconds
            shown_at[0] = time.monotonic()
            picture = Image.open(info.validation) if info.validation else loss_chart(losses, [], steps, title=name)
        update(info.step, info.total, picture)

    try:
        result = core_train_lora(base, dataset, settings, output, name=name, progress=progress, should_stop=should_stop)
    except TrainingInterrupted:
        if in_host():
            import comfy.model_management

            raise comfy.model_management.InterruptProcessingException() from None
        raise
    finally:
        close()
    chart = loss_chart(result.losses, result.lrs, steps, title=name)
    relative = output.name
    summary = [f"TrainLoRA: {relative}: {result.steps} steps" + (
        f", final loss {result.final_loss:.4f}" if result.final_loss is not None else "")]  # fmt: skip
    if result.reused:
        summary.append("this run had already finished: returned the file, nothing trained")
    summary += result.notes
    for line in summary:
        log.info(line)
    return {"ui": {"text": ["\n".join(summary)]}, "result": (result.lora, relative, to_image_batch(chart))}


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


def image_grid(row_1, row_labels: str = "", upscale: int = 2, layout: str = "batch per row", **more_rows):
    from ..sd15.grid import image_grid as core_image_grid
    from ..sd15.images import to_image_batch

    batches = [row_1] + [more_rows[name] for name in sorted(more_rows) if more_rows[name] is not None]
    labels = [line.strip() for line in row_labels.splitlines()]
    if layout == "batch per column":
        rows = [[batch[k] if k < len(batch) else None for batch in batches] for k in range(max(map(len, batches)))]
        return (to_image_batch(core_image_grid(rows, column_labels=labels, upscale=upscale)),)
    return (to_image_batch(core_image_grid(batches, row_labels=labels, upscale=upscale)),)


def file_fingerprint(kind: str, name: str) -> str:
    """IS_CHANGED for loaders: a file replaced under the same name is loaded again."""
    if name in BUILT_IN_BASES:
        return name
    path = model_path(kind, name)
    if path is None:
        return "missing"
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def training_fingerprint(dataset_dir: str = "", output_name: str = "", **_) -> str:
    """IS_CHANGED for TrainLoRA: its dataset's files and its output file, by name, size and mtime — so an edited
    dataset, or a deleted or replaced LoRA file, runs the node again (identical runs then resume or reuse)."""
    try:
        folder = dataset_folder(dataset_dir)
        files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
        output = save_path("loras", f"{_checked_output_name(output_name)}.safetensors")
    except (OSError, ValueError):
        return "invalid"  # the node reports the problem when it runs
    signature = [(p.relative_to(folder).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    if output.is_file():
        signature.append(("output", output.stat().st_size, output.stat().st_mtime_ns))
    return repr(signature)


CHANGE_CHECKS = {
    "LoadBase": lambda ckpt_name, dtype="auto", **_: file_fingerprint("checkpoints", ckpt_name),
    "LoadLoRA": lambda lora_name, **_: file_fingerprint("loras", lora_name),
    "TrainLoRA": training_fingerprint,
}

IMPLEMENTATIONS = {
    "LoadBase": load_base,
    "LoadLoRA": load_lora,
    "ApplyLoRA": apply_lora,
    "FuseLoRA": fuse_lora,
    "TrainLoRA": train_lora,
    "Sampler": sampler,
    "LoomImageGrid": image_grid,
    "ApplyLoRAToModel": apply_lora_to_model,
    "LoomToComfy": loom_to_comfy,
    "ComfyToLoom": comfy_to_loom,
}
