"""Measuring a toy-world model with the scorer: VAE round trips and prompt adherence of sampled images.

Prompts are captions of scenes from ``EVAL_SEED`` (training uses seed 0); pair i is (caption of scene i,
seed i), sampled exactly as the Sampler node would. Each image is scored against its scene. The size is
scored only on the prompts that name it (the caption grammar names it 60 % of the time; an unnamed size is
the model's free choice, not a miss).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .scenes import BASE_COLOURS, HELD_OUT_COLOURS, HELD_OUT_SHAPES, Scene, caption, dataset, sample_scene, scenes
from .scorer import analyse, score

EVAL_SEED = 12345
ATTRIBUTES = ("background", "colour", "shape", "position", "size")
ALL_FOUR = "all four"  # background, colour, shape and position all right (what every caption names)


@dataclass(frozen=True)
class PromptSet:
    prompts: list[str]
    truth: list[Scene]
    seeds: list[int]

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, part: slice) -> PromptSet:
        return PromptSet(self.prompts[part], self.truth[part], self.seeds[part])


def prompt_set(n: int, split: str = "base", seed: int = EVAL_SEED) -> PromptSet:
    """n (caption, scene, seed) triples; the caption phrasing is drawn per scene from a fixed RNG."""
    truth = scenes(n, seed, split)
    rng = np.random.default_rng(seed)
    return PromptSet([caption(scene, rng) for scene in truth], truth, list(range(n)))


def concept_prompt_set(n: int, shapes, colours, seed: int = EVAL_SEED) -> PromptSet:
    """n prompts for a concept's LoRA: one main object drawn from (``shapes``, ``colours``) on a base colour, as
    the concept's training set is drawn (:mod:`.datasets`), from a seed no training set uses."""
    truth, prompts = [], []
    for i in range(n):
        rng = np.random.default_rng([int(seed), 11, i])
        scene = sample_scene(rng, tuple(shapes), tuple(colours), background_colours=BASE_COLOURS, second_prob=0.0)
        truth.append(scene)
        prompts.append(caption(scene, rng))
    return PromptSet(prompts, truth, list(range(n)))


def concept_rate(images, truth: list[Scene], attributes: tuple[str, ...]) -> float:
    """The fraction of images whose main object has its scene's ``attributes`` (e.g. ("shape",) for a shape
    concept, ("shape", "colour") for a combination), read by the scorer."""
    predictions = [analyse(image) for image in images]
    hits = [all(getattr(p, a) == getattr(s, a) for a in attributes) for p, s in zip(predictions, truth, strict=True)]
    return float(np.mean(hits))


def names_size(prompt: str, scene: Scene) -> bool:
    return f"{scene.size} {scene.colour} {scene.shape}" in prompt


@dataclass
class Rates:
    """Fraction right per attribute over the pairs it is scored on (``counts``)."""

    rates: dict[str, float]
    counts: dict[str, int]

    def __getitem__(self, attribute: str) -> float:
        return self.rates[attribute]

    def summary(self) -> str:
        return ", ".join(f"{name} {rate:.1%}" for name, rate in self.rates.items())


def rates_of(images, pairs: PromptSet) -> Rates:
    """Score uint8 HxWx3 images against their pairs' scenes."""
    names = (*ATTRIBUTES, ALL_FOUR)
    hits = {name: 0 for name in names}
    counts = {name: 0 for name in names}
    for image, prompt, scene in zip(images, pairs.prompts, pairs.truth, strict=True):
        verdict = score(image, scene)
        verdict[ALL_FOUR] = all(verdict[name] for name in ATTRIBUTES if name != "size")
        for name in names:
            if name == "size" and not names_size(prompt, scene):
                continue
            counts[name] += 1
            hits[name] += bool(verdict[name])
    return Rates({name: hits[name] / max(1, counts[name]) for name in names}, counts)


def concept_rates(images, truth: list[Scene]) -> dict[str, float]:
    """For each held-out concept present in ``truth``: the fraction of its scenes drawn with it."""
    found = {}
    concepts = [(shape, "shape") for shape in HELD_OUT_SHAPES] + [(colour, "colour") for colour in HELD_OUT_COLOURS]
    for concept, attribute in concepts:
        pairs = zip(images, truth, strict=True)
        drawn = [analyse(image) for image, scene in pairs if getattr(scene, attribute) == concept]
        if drawn:
            found[concept] = float(np.mean([getattr(p, attribute) == concept for p in drawn]))
    return found


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, H, W, 3) floats in [0, 1] → uint8, as the Sampler's IMAGE output is saved."""
    return (images.float().clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def sample_images(base, pairs: PromptSet, *, sampler: str, cfg: float, steps: int, chunk: int = 50) -> np.ndarray:
    from ..sd15.sampling import sample_pairs

    images = []
    for start in range(0, len(pairs), chunk):
        part = pairs[start : start + chunk]
        result = sample_pairs(
            base, part.prompts, part.seeds, steps=steps, cfg=cfg, sampler_name=sampler, width=64, height=64
        )
        images.append(to_uint8(result.images))
    return np.concatenate(images)


def adherence(base, pairs: PromptSet, *, sampler: str, cfg: float, steps: int) -> tuple[Rates, np.ndarray]:
    images = sample_images(base, pairs, sampler=sampler, cfg=cfg, steps=steps)
    return rates_of(images, pairs), images


@torch.no_grad()
def vae_round_trip(vae, split: str, n: int = 200, seed: int = EVAL_SEED) -> tuple[Rates, dict[str, float]]:
    """The VAE's ceiling: ground-truth images encoded and decoded (posterior mean), scored per attribute;
    and the held-out concepts' rates (:func:`concept_rates`)."""
    samples = dataset(n, seed, split)
    pixels = torch.from_numpy(np.stack([np.asarray(sample.image) for sample in samples]))
    x = pixels.permute(0, 3, 1, 2).to(vae.dtype) / 127.5 - 1.0
    decoded = torch.cat([vae.decode(vae.encode(part).latent_dist.mean).sample for part in x.split(100)])
    images = to_uint8((decoded.float().permute(0, 2, 3, 1) + 1) / 2)
    verdicts = [score(image, sample.scene) for image, sample in zip(images, samples, strict=True)]
    rates = {name: float(np.mean([v[name] for v in verdicts])) for name in ATTRIBUTES}
    return Rates(rates, {name: n for name in ATTRIBUTES}), concept_rates(images, [s.scene for s in samples])
