"""The training set encoded once: VAE latents (and text-encoder outputs while the text encoder is frozen),
cached on disk keyed by content, so a second run over the same data and base encodes nothing.

A latent's key is (image bytes, bucket, the base's VAE); a text embedding's key is (caption, the base's text
encoder as the handle carries it, LoRAs included). Latents are the posterior mean times the VAE's scaling
factor: deterministic, as kohya's latent cache is stable across runs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..files import atomic_write, cache_dir
from .dataset import Dataset, load_pixels


def encoded_cache_dir() -> Path:
    return cache_dir() / "training"


def _digest(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:40]


def _load(path: Path) -> torch.Tensor | None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))["value"]
    except (OSError, SafetensorError, KeyError):
        return None  # missing or damaged: encode again


def _store(path: Path, value: torch.Tensor) -> None:
    from safetensors.torch import save

    payload = save({"value": value.detach().to("cpu").contiguous()})
    atomic_write(path, lambda temporary: temporary.write_bytes(payload))


@dataclass
class EncodeCounts:
    encoded: int = 0
    from_cache: int = 0

    def __str__(self) -> str:
        return f"{self.encoded} encoded, {self.from_cache} from the cache"


def encode_latents(dataset: Dataset, vae: torch.nn.Module, vae_key: str, counts: EncodeCounts) -> list[torch.Tensor]:
    """Per dataset item, its latent [4, h, w] (float32, CPU), scaled by the VAE's scaling factor."""
    folder = encoded_cache_dir() / "latents"
    latents = []
    for item in dataset.items:
        path = folder / f"{_digest(item.digest, item.bucket, vae_key)}.safetensors"
        latent = _load(path)
        if latent is None:
            pixels = load_pixels(item)[None].to(vae.device, vae.dtype)
            with torch.no_grad():
                mean = vae.encode(pixels).latent_dist.mode()
            latent = (mean.float() * vae.config.scaling_factor)[0].cpu()
            _store(path, latent)
            counts.encoded += 1
        else:
            counts.from_cache += 1
        latents.append(latent)
    return latents


def encode_captions(
    captions: list[str], encode: Callable[[str], torch.Tensor], text_key: str, counts: EncodeCounts
) -> dict[str, torch.Tensor]:
    """{caption: the frozen text encoder's last hidden state [77, width]} (float32, CPU); `encode(caption)`
    computes one."""
    folder = encoded_cache_dir() / "text"
    embeddings = {}
    for caption in sorted(set(captions)):
        path = folder / f"{_digest(caption, text_key)}.safetensors"
        embedding = _load(path)
        if embedding is None:
            with torch.no_grad():
                embedding = encode(caption).float().cpu()
            _store(path, embedding)
            counts.encoded += 1
        else:
            counts.from_cache += 1
        embeddings[caption] = embedding
    return embeddings
