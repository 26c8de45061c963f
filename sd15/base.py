"""SD_BASE: a cheap handle on one shared, patchable SD1.5 model.

A handle is (shared model, fused layers, patch set). Applying or fusing a LoRA makes a new handle and
touches no weight; the Sampler brings the shared weights to its handle's state right before use, so
branches from one base stay correct and independent in any execution order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..files import atomic_write, cache_dir
from ..lora_core.lora import LoRA
from ..lora_core.patcher import PatchEngine, PatchEntry, PatchSet, PatchStats
from ..lora_core.weight_source import FileWeightSource
from .builtin import BUILT_IN_TINY, BUILT_IN_TOY, TOY_WORLD_CHECKPOINT
from .config_files import config_dir, load_config_dicts
from .models import SD15Components, build_components, load_single_file, save_single_file

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class BaseLoadError(ValueError):
    """A checkpoint could not be loaded (the message names the file)."""


@dataclass(eq=False)
class LoadedModel:
    """The shared modules of one loaded checkpoint, and the engine that patches them."""

    name: str
    components: SD15Components
    engine: PatchEngine
    dtype: torch.dtype
    device: torch.device
    tokenizer_source: str | None = None
    identity: str = ""  # which weights these are: the source file or folder, its size and mtime
    lock: threading.RLock = field(default_factory=threading.RLock)

    def __post_init__(self) -> None:
        # The base is frozen: only LoRA factors are ever trained on it (and the engine writes weights in place).
        for _, module in self.components.items():
            module.requires_grad_(False)

    @property
    def scheduler_config(self) -> dict:
        return json.loads((config_dir("sd15") / "scheduler" / "scheduler_config.json").read_text())


@dataclass(frozen=True, eq=False)
class SDBase:
    """A handle: the shared model plus the LoRAs this branch of the graph has applied and fused."""

    model: LoadedModel
    fused: tuple[PatchSet, ...] = ()
    patches: PatchSet = ()

    def with_lora(self, lora: LoRA, strength_unet: float, strength_text_encoder: float) -> SDBase:
        entry = PatchEntry(lora, float(strength_unet), float(strength_text_encoder))
        return dataclasses.replace(self, patches=(*self.patches, entry))

    def fused_base(self) -> SDBase:
        """The applied LoRAs become part of the base (rounded, as if saved and re-loaded)."""
        if not self.patches:
            return self
        return dataclasses.replace(self, fused=(*self.fused, self.patches), patches=())

    def activate(self) -> PatchStats:
        """Bring the shared weights to this handle's state (only weights that differ are written)."""
        with self.model.lock:
            return self.model.engine.apply(self.patches, fused_layers=self.fused)

    def state_key(self, component: str) -> str:
        """A digest of what one component (`unet`, `text_encoder`, `vae`) computes with on this handle: the
        loaded weights, their dtype and device, and the fused and applied LoRAs at their strengths for it."""
        model = self.model
        parts: list[object] = [model.identity or model.name, str(model.dtype), model.device.type, component]
        if component != "vae":  # LoRAs never touch the VAE
            for layer in (*self.fused, self.patches):
                parts.append([(e.lora.fingerprint, e.strength_for(component)) for e in layer])
        return hashlib.sha256(repr(parts).encode()).hexdigest()

    def save(self, path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> Path:
        """Write this handle's weights as a single-file SD1.5 checkpoint (original layout).

        Written atomically: a loaded base may be re-reading W0 from a file of the same name, which must
        never be truncated under it.
        """
        with self.model.lock:
            self.activate()
            return atomic_write(path, lambda temporary: save_single_file(self.model.components, temporary, dtype=dtype))


def built_in_tiny_checkpoint() -> Path:
    """The built-in tiny base as a checkpoint file (written once), so it loads like any user file."""
    configs = json.dumps(load_config_dicts("tiny-sd15"), sort_keys=True).encode()
    tag = f"torch{torch.__version__.split('+')[0]}-{hashlib.sha256(configs).hexdigest()[:10]}"
    path = cache_dir() / f"tiny-sd15-seed0-{tag}.safetensors"
    if not path.is_file():
        atomic_write(path, lambda temporary: save_single_file(build_components("tiny-sd15", seed=0), temporary))
    return path


def built_in_checkpoint(name: str) -> Path | None:
    """The file behind a built-in base name, or None if ``name`` is not a built-in base."""
    if name == BUILT_IN_TOY:
        return TOY_WORLD_CHECKPOINT
    if name == BUILT_IN_TINY:
        return built_in_tiny_checkpoint()
    return None


def _auto_dtype(path: Path, device: torch.device) -> torch.dtype:
    """ "auto": the file's own precision on a GPU; float32 on the CPU, where half-precision math is slow and
    lossy (as ComfyUI does)."""
    return _file_dtype(path) if device.type != "cpu" else torch.float32


def _file_dtype(path: Path) -> torch.dtype:
    """The precision a checkpoint's U-Net is stored in."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        key = next((k for k in f.keys() if k.startswith("model.diffusion_model.")), None)
        if key is None:
            raise BaseLoadError(f"{path}: no U-Net tensors (model.diffusion_model.*): not an SD1.5 checkpoint")
        stored = f.get_slice(key).get_dtype()
    return {"F16": torch.float16, "BF16": torch.bfloat16}.get(stored, torch.float32)


def _ckpt_as_safetensors(path: Path) -> Path:
    """A `.ckpt`/`.pt` checkpoint, read with safe unpickling only, re-written once as safetensors."""
    from safetensors.torch import save_file

    stat = path.stat()
    cached = cache_dir() / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}.safetensors"
    if not cached.is_file():
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise BaseLoadError(f"{path}: not a readable checkpoint ({type(error).__name__}: {error})") from None
        state = data.get("state_dict", data) if isinstance(data, dict) else None
        if not isinstance(state, dict):
            raise BaseLoadError(f"{path}: holds no state dict")
        tensors = {k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
        atomic_write(cached, lambda temporary: save_file(tensors, str(temporary)))
    return cached


def load_base(
    name_or_path: str | os.PathLike, *, dtype: str = "auto", device: str | torch.device | None = None
) -> SDBase:
    """Load an SD1.5 base: a built-in one (:data:`BUILT_IN_TOY`, :data:`BUILT_IN_TINY`), a single-file
    checkpoint, or a diffusers folder. Built-in bases are files too, loaded by the same code path."""
    if dtype != "auto" and dtype not in DTYPES:
        raise BaseLoadError(f"dtype must be auto, fp32, fp16 or bf16, not {dtype!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    path = built_in_checkpoint(str(name_or_path)) or Path(name_or_path)
    if not path.exists():
        raise BaseLoadError(f"{path}: no such checkpoint")
    # Normal tensors even when the host (or the runner) loads under inference mode: a training node must be
    # able to run autograd through these frozen weights, and inference tensors cannot be saved for backward.
    with torch.inference_mode(False), torch.no_grad():
        if path.is_dir():
            return _load_diffusers_folder(path, dtype, device)
        return _load_single_file_base(path, name_or_path, dtype, device)


def _load_single_file_base(path: Path, name: str | os.PathLike, dtype: str, device: torch.device) -> SDBase:
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        path = _ckpt_as_safetensors(path)
    try:
        torch_dtype = DTYPES[dtype] if dtype != "auto" else _auto_dtype(path, device)
        components, key_map = load_single_file(path, dtype=torch_dtype, device=device)
    except BaseLoadError:
        raise
    except Exception as error:
        raise BaseLoadError(f"{path}: {error}") from None
    engine = PatchEngine(
        {"unet": components.unet, "text_encoder": components.text_encoder}, FileWeightSource(path, key_map)
    )
    model = LoadedModel(str(name), components, engine, torch_dtype, device, identity=_identity(path))
    return SDBase(model)


def _load_diffusers_folder(folder: Path, dtype: str, device: torch.device) -> SDBase:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch_dtype = DTYPES.get(dtype)
    try:
        options = {"local_files_only": True, "torch_dtype": torch_dtype} if torch_dtype else {"local_files_only": True}
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **options)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **options)
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", **options)
    except Exception as error:
        raise BaseLoadError(f"{folder}: not a loadable diffusers SD1.5 folder ({error})") from None
    components = SD15Components(unet=unet, vae=vae, text_encoder=text_encoder)
    for _, module in components.items():
        torch.nn.Module.to(module, device=device)
        module.eval()
    # No single file backs these weights: the engine keeps a copy of each weight it patches.
    engine = PatchEngine({"unet": unet, "text_encoder": text_encoder})
    tokenizer_source = str(folder) if (folder / "tokenizer" / "vocab.json").is_file() else None
    files = sorted(p for part in ("unet", "vae", "text_encoder") for p in (folder / part).iterdir() if p.is_file())
    identity = ";".join(_identity(p) for p in files)
    model = LoadedModel(str(folder), components, engine, unet.dtype, device, tokenizer_source, identity)
    return SDBase(model)


def _identity(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
