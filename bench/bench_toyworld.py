"""Quality of the built-in toy-world base, measured by the plain-image-analysis scorer.

    python bench/bench_toyworld.py [--pairs 200] [--steps 20]

Prompts are captions of held-back scenes (a seed the training data never used) from the base vocabulary;
pair i is (caption of scene i, seed i) and is sampled exactly as the Sampler node would with that prompt
and seed. Each image is scored against its scene: background colour, main-object colour, shape, position
(column and row), size. Run for euler, dpmpp_2m and ddim at CFG 1, 2 (the shipped workflows' setting) and 7;
plus one run on prompts with the held-out concepts (star, cyan), which the base never saw. Writes the table
into docs/benchmarks.md and an example prompt × seed grid to docs/images/toy-world-grid.png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from lora_loom.sd15.base import load_base  # noqa: E402
from lora_loom.sd15.builtin import BUILT_IN_TOY  # noqa: E402
from lora_loom.sd15.grid import image_grid  # noqa: E402
from lora_loom.sd15.sampling import sample_pairs  # noqa: E402
from lora_loom.toyworld import caption, dataset, scenes, score  # noqa: E402

from common import write_doc  # noqa: E402

HEADING = "## Toy-world base quality (bench/bench_toyworld.py)"
GRID = ROOT / "docs" / "images" / "toy-world-grid.png"
EVAL_SEED = 12345  # scene seed of the prompt set; training used seed 0
ATTRIBUTES = ("background", "colour", "shape", "position", "size")
GOALS = {"background": 0.90, "colour": 0.90, "shape": 0.75, "position": 0.80}
SAMPLERS = ("euler", "dpmpp_2m", "ddim")
CFGS = (1.0, 2.0, 7.0)
DEFAULT_CFG = 2.0  # what the shipped workflows use on the toy base (best adherence of 1-9, see docs/toy-world.md)
SIZE = 64


def prompt_set(n: int, split: str = "base") -> tuple[list[str], list, list[int]]:
    """n (caption, scene, seed) triples; the caption phrasing is drawn per scene from a fixed RNG."""
    truth = scenes(n, EVAL_SEED, split)
    rng = np.random.default_rng(EVAL_SEED)
    return [caption(scene, rng) for scene in truth], truth, list(range(n))


def evaluate(base, prompts, truth, seeds, *, sampler: str, cfg: float, steps: int, chunk: int = 50):
    """Fraction correct per attribute (+ "all four"), and the images."""
    hits = {name: 0 for name in ATTRIBUTES}
    hits["all four"] = 0
    images = []
    for start in range(0, len(prompts), chunk):
        result = sample_pairs(
            base,
            prompts[start : start + chunk],
            seeds[start : start + chunk],
            steps=steps,
            cfg=cfg,
            sampler_name=sampler,
            width=SIZE,
            height=SIZE,
        )
        for image, scene in zip(result.images, truth[start : start + chunk], strict=True):
            pixels = (image.numpy() * 255).round().astype(np.uint8)
            images.append(pixels)
            verdict = score(pixels, scene)
            for name in ATTRIBUTES:
                hits[name] += bool(verdict[name])
            hits["all four"] += all(verdict[name] for name in GOALS)
    return {name: count / len(prompts) for name, count in hits.items()}, images


@torch.no_grad()
def vae_round_trip(base, split: str, n: int = 200) -> dict[str, float]:
    """The VAE's ceiling: ground-truth images encoded and decoded (posterior mean), scored."""
    vae = base.model.components.vae
    samples = dataset(n, EVAL_SEED, split)
    pixels = torch.from_numpy(np.stack([np.asarray(sample.image) for sample in samples]))
    x = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    decoded = vae.decode(vae.encode(x).latent_dist.mean).sample
    images = ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    verdicts = [score(image, sample.scene) for image, sample in zip(images, samples, strict=True)]
    return {name: float(np.mean([v[name] for v in verdicts])) for name in ATTRIBUTES}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-doc", action="store_true", help="print only; leave docs/ alone")
    args = parser.parse_args(argv)

    base = load_base(BUILT_IN_TOY, dtype="fp32", device="cpu")
    prompts, truth, seeds = prompt_set(args.pairs)
    rows = []
    for sampler in SAMPLERS:
        for cfg in CFGS:
            started = time.perf_counter()
            rates, _ = evaluate(base, prompts, truth, seeds, sampler=sampler, cfg=cfg, steps=args.steps)
            seconds = time.perf_counter() - started
            rows.append((sampler, cfg, rates, seconds))
            print(f"{sampler:9s} cfg {cfg:g}: " + ", ".join(f"{k} {v:.1%}" for k, v in rates.items()), flush=True)
    ceiling = {split: vae_round_trip(base, split) for split in ("base", "held_out")}
    print("VAE round trip: " + str(ceiling))
    held_prompts, held_truth, held_seeds = prompt_set(100, "held_out")
    held_rates, _ = evaluate(
        base, held_prompts, held_truth, held_seeds, sampler="euler", cfg=DEFAULT_CFG, steps=args.steps
    )
    print("held-out concepts: " + ", ".join(f"{k} {v:.1%}" for k, v in held_rates.items()))

    # Example grid: 6 prompts (rows) × 6 seeds (columns), euler, the workflows' CFG.
    grid_prompts = prompts[:6]
    grid_rows = []
    for prompt in grid_prompts:
        result = sample_pairs(
            base, [prompt] * 6, list(range(6)), steps=args.steps, cfg=DEFAULT_CFG, width=SIZE, height=SIZE
        )
        grid_rows.append(result.images)
    picture = image_grid(grid_rows, row_labels=grid_prompts, column_labels=[f"seed {s}" for s in range(6)], upscale=2)

    def cell(rate: float, goal: float | None) -> str:
        text = f"{rate:.1%}"
        return f"**{text}**" if goal is not None and rate >= goal else text

    lines = [
        HEADING,
        "",
        f"Built-in `{BUILT_IN_TOY}` (fp32, CPU), {args.pairs} (prompt, seed) pairs per row, {args.steps} steps, "
        f"{SIZE}×{SIZE}, scheduler `normal`. Prompts are captions of scenes from seed {EVAL_SEED} (training used "
        "seed 0), base vocabulary; each image is scored by `toyworld.scorer` (plain image analysis) against its "
        "scene. Position = column and row both right. Bold = goal met (background, colour ≥ 90 %, shape ≥ 75 %, "
        "position ≥ 80 %). Regenerate with `python bench/bench_toyworld.py`.",
        "",
        "| sampler | CFG | background | colour | shape | position | size | all four | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for sampler, cfg, rates, seconds in rows:
        cells = [cell(rates[name], GOALS.get(name)) for name in ATTRIBUTES]
        lines.append(f"| {sampler} | {cfg:g} | " + " | ".join(cells) + f" | {rates['all four']:.1%} | {seconds:.0f} |")
    lines += [
        "",
        "Held-out concepts (never in base training; for LoRA training later), 100 pairs, euler, "
        f"CFG {DEFAULT_CFG:g} — low "
        "shape/colour scores here are expected: "
        + ", ".join(f"{name} {held_rates[name]:.1%}" for name in ATTRIBUTES)
        + ".",
        "",
        "VAE round trip (ground-truth images encoded and decoded, 200 each; the ceiling for any sampler): "
        + "; ".join(
            f"{split} " + ", ".join(f"{name} {rates[name]:.1%}" for name in ATTRIBUTES)
            for split, rates in ceiling.items()
        )
        + ".",
        "",
        f"![toy-world grid: 6 prompts × 6 seeds, euler, CFG {DEFAULT_CFG:g}](images/toy-world-grid.png)",
        "",
    ]
    section = "\n".join(lines)
    print(section)
    if not args.no_doc:
        GRID.parent.mkdir(parents=True, exist_ok=True)
        picture.save(GRID)
        write_doc(section, HEADING)


if __name__ == "__main__":
    main()
