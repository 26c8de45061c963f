"""TrainLoRA's settings as data: names and defaults as the node shows them, checked once, hashed for resume."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

TARGETS = ("attention", "kohya")
OPTIMIZERS = ("AdamW", "AdamW8bit")
LR_SCHEDULERS = ("constant", "cosine", "linear")
MIXED_PRECISIONS = ("fp32", "bf16", "fp16")
# Settings that change what is saved or shown, never the trained numbers: a run that differs only in these
# resumes (or is reused) rather than starting over.
NOT_IN_RUN_KEY = frozenset({"save_every_n_steps", "validation_prompt", "validation_every_n_steps"})


class SettingsError(ValueError):
    """A setting is out of range (the message names it)."""


@dataclass(frozen=True)
class TrainSettings:
    rank: int = 16
    alpha: float = 16.0
    steps: int = 500
    learning_rate: float = 1e-4  # U-Net
    text_encoder_lr: float = 5e-5
    batch_size: int = 1
    resolution: int = 512
    seed: int = 0
    train_text_encoder: bool = False
    target: str = "attention"
    optimizer: str = "AdamW"
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    min_snr_gamma: float = 5.0  # 0: off
    noise_offset: float = 0.0
    gradient_checkpointing: bool = False
    mixed_precision: str = "fp32"
    save_every_n_steps: int = 0  # 0: only the final file
    use_rslora: bool = False
    validation_prompt: str = ""
    validation_every_n_steps: int = 0  # 0: off
    max_grad_norm: float = 1.0  # kohya's and diffusers' default clipping

    def __post_init__(self) -> None:
        choices = {
            "target": TARGETS,
            "optimizer": OPTIMIZERS,
            "lr_scheduler": LR_SCHEDULERS,
            "mixed_precision": MIXED_PRECISIONS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise SettingsError(f"{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        if not 1 <= self.rank <= 256:
            raise SettingsError(f"rank must be 1…256, not {self.rank}")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("warmup_steps", "save_every_n_steps", "validation_every_n_steps", "seed"):
            if getattr(self, name) < 0:
                raise SettingsError(f"{name} must not be negative, not {getattr(self, name)}")
        if self.resolution < 64 or self.resolution % 64:
            # SD1.5's U-Net halves a latent three times: sides must be multiples of 8 latent pixels (64 px).
            raise SettingsError(f"resolution must be a multiple of 64 (at least 64), not {self.resolution}")
        for name in ("learning_rate", "text_encoder_lr", "alpha", "min_snr_gamma", "noise_offset"):
            if getattr(self, name) < 0:
                raise SettingsError(f"{name} must not be negative, not {getattr(self, name)}")

    @property
    def scale(self) -> float:
        return self.alpha / (self.rank**0.5 if self.use_rslora else self.rank)

    def run_key(self) -> str:
        """A digest of every setting that changes the trained numbers."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in NOT_IN_RUN_KEY}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
