"""The `ss_*` / `modelspec.*` metadata of a TrainLoRA file, as kohya's `train_network.py` writes it.

Values are strings as kohya's `str(v)` makes them (None → "None", True → "True", (512, 512) → "(512, 512)");
JSON values (`ss_tag_frequency`, `ss_dataset_dirs`, `ss_bucket_info`) are JSON text. No timestamps or session
ids: the same run gives a bitwise identical file. The writer adds `ss_network_*`, the fixed kohya keys and the
`sshs_*` hashes.
"""

from __future__ import annotations

import json

from .dataset import Dataset
from .settings import TrainSettings

# kohya records accelerate's mixed-precision names.
_MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
_OPTIMIZER_CLASSES = {"AdamW": "torch.optim.adamw.AdamW", "AdamW8bit": "bitsandbytes.optim.adamw.AdamW8bit"}


def training_metadata(
    settings: TrainSettings,
    dataset: Dataset,
    *,
    output_name: str,
    steps_done: int,
    epoch: int,
    num_epochs: int,
    base_name: str,
    prediction_type: str,
    run_key: str,
) -> dict[str, str]:
    resolution = settings.resolution
    metadata: dict[str, object] = {
        "ss_output_name": output_name,
        "ss_sd_model_name": base_name,
        "ss_resolution": (resolution, resolution),
        "ss_steps": steps_done,
        "ss_max_train_steps": settings.steps,
        "ss_epoch": epoch,
        "ss_num_epochs": num_epochs,
        "ss_learning_rate": settings.learning_rate,
        "ss_unet_lr": settings.learning_rate,
        "ss_text_encoder_lr": settings.text_encoder_lr if settings.train_text_encoder else None,
        "ss_network_train_unet_only": not settings.train_text_encoder,
        "ss_num_train_images": dataset.num_train_images,
        "ss_batch_size_per_device": settings.batch_size,
        "ss_tag_frequency": json.dumps(dataset.tag_frequency()),
        "ss_dataset_dirs": json.dumps(dataset.dataset_dirs()),
        "ss_bucket_info": json.dumps(dataset.bucket_info()),
        "ss_enable_bucket": True,
        "ss_cache_latents": True,
        "ss_seed": settings.seed,
        "ss_optimizer": _OPTIMIZER_CLASSES[settings.optimizer] + "(weight_decay=0.01)",
        "ss_lr_scheduler": settings.lr_scheduler,
        "ss_lr_warmup_steps": settings.warmup_steps,
        "ss_min_snr_gamma": settings.min_snr_gamma or None,
        "ss_noise_offset": settings.noise_offset or None,
        "ss_mixed_precision": _MIXED_PRECISION[settings.mixed_precision],
        "ss_gradient_checkpointing": settings.gradient_checkpointing,
        "ss_max_grad_norm": settings.max_grad_norm,
        "ss_caption_dropout_rate": 0.0,
        "ss_clip_skip": None,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": prediction_type,
        "lora_loom.target": settings.target,
        "lora_loom.rank_scaling": "rsLoRA: scale alpha/sqrt(rank), stored alpha = alpha*sqrt(rank)"
        if settings.use_rslora
        else "alpha/rank",
        "lora_loom.run_key": run_key,
    }
    if dataset.caption_prefix:
        metadata["modelspec.trigger_phrase"] = dataset.caption_prefix
    return {key: str(value) for key, value in metadata.items()}
