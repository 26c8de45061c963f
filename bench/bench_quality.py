"""The LoRA quality protocol on the toy world: does a LoRA teach a concept the base never saw, does strength
behave, does the rest of the model survive — measured by the scorer, not by eye.

    python bench/bench_quality.py [--pairs 100] [--steps 20] [--checkpoint PATH] [--parts ...] [--no-doc]
                                  [--keep-loras sd15/builtin/loras]

For each held-out concept (the shape `star`, the colour `cyan`, and both at once) TrainLoRA trains on the
concept's built-in training set (12 generated images; the concept's own word is the trigger in every caption)
with the settings of `workflows/train_then_apply.json`, then:

- ``curve``: the concept rate (the scorer reads the concept on the main object) at strengths 0, 0.25, 0.5, 0.75
  and 1 over ``--pairs`` (prompt, seed) pairs of the concept, from a seed no training set uses;
- ``prior``: adherence on ordinary base prompts (no trigger) with the LoRA at 1, against the base alone;
- ``fuse``: the LoRA fused into the base, saved, loaded as a new base: its concept rate and how many of its
  images equal the applied LoRA's pixel for pixel;
- ``reference``: the same data, steps and settings through diffusers' LoRA training loop
  (`examples/text_to_image/train_text_to_image_lora.py`: PEFT adapter with its Gaussian init, AdamW, the
  scheduler's `add_noise`, min-SNR-γ, grad clipping; saved with `save_lora_weights`) — its file loaded by
  LoadLoRA, its concept rate and wall time beside ours;

and for the star only:

- ``split``: a LoRA trained with the text encoder, at U-Net strength only, text-encoder strength only, both;
- ``ranks``: rank 1 / 4 / 16 × `attention` / `kohya` targets: concept rate at 1, file size, training time.

Samples: euler, 20 steps, CFG 2 (the shipped workflows' setting on the toy base), 64×64. Writes the section
"## LoRA quality on the toy world" of docs/benchmarks.md, a strength-curve plot and a strength × seed grid per
concept under docs/images/. Some 20–40 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from lora_loom.lora_core.formats import load_lora  # noqa: E402
from lora_loom.sd15.base import load_base  # noqa: E402
from lora_loom.sd15.builtin import BUILT_IN_TOY  # noqa: E402
from lora_loom.sd15.grid import image_grid  # noqa: E402
from lora_loom.toyworld.datasets import built_in_dataset  # noqa: E402
from lora_loom.toyworld.evaluate import (  # noqa: E402
    ATTRIBUTES,
    concept_prompt_set,
    concept_rate,
    prompt_set,
    rates_of,
    sample_images,
)
from lora_loom.toyworld.scenes import BASE_COLOURS, BASE_SHAPES  # noqa: E402
from lora_loom.training.dataset import load_pixels, scan_dataset  # noqa: E402
from lora_loom.training.settings import TrainSettings  # noqa: E402
from lora_loom.training.trainer import train_lora  # noqa: E402

from common import progress, write_doc  # noqa: E402

HEADING = "## LoRA quality on the toy world (bench/bench_quality.py)"
IMAGES = ROOT / "docs" / "images"
CURVE = IMAGES / "quality-strength-curve.png"
STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
SAMPLER, CFG = "euler", 2.0
GRID_SEEDS = 4
# The settings of workflows/train_then_apply.json's TrainLoRA node: what a user starting from our example runs.
SETTINGS = TrainSettings(rank=16, alpha=16.0, steps=300, learning_rate=1e-3, batch_size=1, resolution=64, seed=0)
RANK_STUDY = ((1, "attention"), (4, "attention"), (16, "attention"), (1, "kohya"), (4, "kohya"), (16, "kohya"))
# Issue 16's goals.
GOAL_RATE = 0.90  # concept rate at strength 1
GOAL_PRIOR_DROP = 0.03  # adherence drop per attribute on base prompts, LoRA at 1
PARTS = ("curve", "prior", "fuse", "reference", "split", "ranks")


@dataclass(frozen=True)
class Concept:
    name: str
    dataset: str  # a built-in training set (toyworld/datasets.py)
    shapes: tuple[str, ...]  # the main object's vocabulary in its evaluation prompts
    colours: tuple[str, ...]
    attributes: tuple[str, ...]  # what the concept is about: read on the main object by the scorer

    @property
    def slug(self) -> str:
        return self.name.replace(" ", "-")


CONCEPTS = (
    Concept("star", "toy-star (built-in)", ("star",), BASE_COLOURS, ("shape",)),
    Concept("cyan", "toy-cyan (built-in)", BASE_SHAPES, ("cyan",), ("colour",)),
    Concept("cyan star", "toy-cyan-star (built-in)", ("star",), ("cyan",), ("shape", "colour")),
)


@dataclass
class Trained:
    path: Path
    seconds: float
    final_loss: float


class Bench:
    def __init__(self, base, pairs: int, steps: int, scratch: Path) -> None:
        self.base, self.pairs, self.steps, self.scratch = base, pairs, steps, scratch

    def images(self, handle, prompts) -> np.ndarray:
        return sample_images(handle, prompts, sampler=SAMPLER, cfg=CFG, steps=self.steps)

    def rate(self, handle, concept: Concept) -> tuple[float, np.ndarray]:
        prompts = concept_prompt_set(self.pairs, concept.shapes, concept.colours)
        images = self.images(handle, prompts)
        return concept_rate(images, prompts.truth, concept.attributes), images

    def train(self, concept: Concept, settings: TrainSettings, label: str) -> Trained:
        dataset = scan_dataset(built_in_dataset(concept.dataset), resolution=settings.resolution)
        # The default LoRA carries its built-in name (ss_output_name) in case it ships (--keep-loras).
        stem = f"toy-{concept.slug}" if label == "default" else f"{concept.slug}-{label}"
        output = self.scratch / f"{stem}.safetensors"
        started = time.perf_counter()
        result = train_lora(self.base, dataset, settings, output)
        seconds = time.perf_counter() - started
        progress(f"trained {output.name}: {seconds:.0f} s, final loss {result.final_loss:.4f}")
        return Trained(output, seconds, result.final_loss)


def train_reference(base, dataset, settings: TrainSettings, output: Path) -> float:
    """diffusers' train_text_to_image_lora.py loop (U-Net LoRA) on a copy of the base's models; writes its
    file with the pipeline's `save_lora_weights` and returns the wall time. Latents and the (frozen) text
    encoder's embeddings are computed once, as our trainer does, so the times compare the training steps."""
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from diffusers.training_utils import compute_snr
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from lora_loom.sd15.config_files import config_dir
    from lora_loom.sd15.tokenizer import load_clip_tokenizer

    started = time.perf_counter()
    components = base.model.components
    unet, text_encoder, vae = (copy.deepcopy(m) for m in (components.unet, components.text_encoder, components.vae))
    for model in (unet, text_encoder, vae):
        model.requires_grad_(False)
    torch.manual_seed(settings.seed)
    lora_config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        init_lora_weights="gaussian",
        target_modules=["to_k", "to_q", "to_v", "to_out.0"],
    )
    unet.add_adapter(lora_config)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    scheduler = DDPMScheduler.from_pretrained(config_dir("sd15"), subfolder="scheduler")
    tokenizer = load_clip_tokenizer()
    with torch.no_grad():
        latents = (
            torch.cat([vae.encode(load_pixels(item)[None]).latent_dist.sample() for item in dataset.items])
            * vae.config.scaling_factor
        )
        ids = tokenizer(
            [item.caption for item in dataset.items],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        embeddings = text_encoder(ids)[0]
    generator = torch.Generator().manual_seed(settings.seed)
    order: list[int] = []
    unet.train()
    for _ in range(settings.steps):
        if len(order) < settings.batch_size:  # a DataLoader with shuffle=True: a new permutation per epoch
            order += torch.randperm(len(dataset.items), generator=generator).tolist()
        batch, order = order[: settings.batch_size], order[settings.batch_size :]
        x0 = latents[batch]
        noise = torch.randn(x0.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(batch),), generator=generator)
        prediction = unet(scheduler.add_noise(x0, noise, timesteps), timesteps, embeddings[batch]).sample
        snr = compute_snr(scheduler, timesteps)
        weights = torch.stack([snr, settings.min_snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0] / snr
        loss = (F.mse_loss(prediction.float(), noise.float(), reduction="none").mean(dim=[1, 2, 3]) * weights).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(output.parent, unet_lora_layers=layers, weight_name=output.name)
    return time.perf_counter() - started


def strength_curve_chart(curves: dict[str, list[float]], width: int = 640, height: int = 360) -> Image.Image:
    """Concept rate against strength, one line per concept, with the goal at strength 1. Pillow only."""
    chart = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(chart)
    x0, y0, x1, y1 = 60, 30, width - 20, height - 50
    draw.rectangle([x0, y0, x1, y1], outline=(160, 160, 160))
    draw.text((x0, 8), f"concept rate vs LoRA strength ({SAMPLER}, CFG {CFG:g})", fill="black")

    def point(strength: float, rate: float) -> tuple[float, float]:
        return x0 + (x1 - x0) * strength, y1 - (y1 - y0) * rate

    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x, y = point(tick, tick)
        draw.line([(x0, y), (x1, y)], fill=(235, 235, 235))
        draw.text((x0 - 40, y - 6), f"{tick:.0%}", fill="black")
        draw.text((x - 10, y1 + 6), f"{tick:g}", fill="black")
    goal = point(0, GOAL_RATE)[1]
    draw.line([(x0, goal), (x1, goal)], fill=(200, 60, 60))
    draw.text((x1 - 80, goal - 14), f"goal {GOAL_RATE:.0%}", fill=(200, 60, 60))
    colours = [(20, 70, 160), (30, 150, 160), (215, 120, 40), (90, 90, 90)]
    for i, (name, rates) in enumerate(curves.items()):
        points = [point(s, r) for s, r in zip(STRENGTHS, rates, strict=True)]
        draw.line(points, fill=colours[i % len(colours)], width=3)
        for x, y in points:
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colours[i % len(colours)])
        draw.text((x0 + 10 + 120 * i, y1 + 26), name, fill=colours[i % len(colours)])
    return chart


def pct(rate: float) -> str:
    return f"{rate:.1%}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20, help="sampling steps")
    parser.add_argument("--train-steps", type=int, default=SETTINGS.steps)
    parser.add_argument("--checkpoint", help="measure on this toy-world checkpoint (implies --no-doc)")
    parser.add_argument("--concepts", default=",".join(c.name for c in CONCEPTS), help="comma-separated subset")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " + ", ".join(PARTS))
    parser.add_argument("--no-doc", action="store_true", help="print only; leave docs/ alone")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--keep-loras", type=Path, help="copy each concept's default LoRA here as toy-<concept>.safetensors (built-ins)"
    )
    args = parser.parse_args(argv)
    args.no_doc = args.no_doc or args.checkpoint is not None
    parts = set(args.parts.split(","))
    concepts = [c for c in CONCEPTS if c.name in args.concepts.split(",")]
    settings = replace(SETTINGS, steps=args.train_steps)
    torch.set_num_threads(args.threads)

    scratch = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    base = load_base(args.checkpoint or BUILT_IN_TOY, dtype="fp32", device="cpu")
    bench = Bench(base, args.pairs, args.steps, scratch)
    lines = [HEADING, ""]
    lines += [
        f"Base `{args.checkpoint or BUILT_IN_TOY}` (fp32, CPU). Each LoRA: TrainLoRA with the settings of "
        f"`workflows/train_then_apply.json` — rank {settings.rank}, alpha {settings.alpha:g}, `{settings.target}` "
        f"targets, {settings.steps} steps, batch {settings.batch_size}, AdamW at {settings.learning_rate:g}, "
        f"constant LR, min-SNR-γ {settings.min_snr_gamma:g}, {settings.resolution}×{settings.resolution}, seed "
        f"{settings.seed}, U-Net only unless said — on the concept's built-in training set (12 images; the "
        "concept's word is in every caption). Scored over "
        f"{args.pairs} (prompt, seed) pairs per cell, {SAMPLER}, {args.steps} steps, CFG {CFG:g}, by "
        "`toyworld.scorer`; prompts from a seed no training set uses. Regenerate with "
        "`python bench/bench_quality.py`.",
        "",
    ]

    base_prior = None
    if "prior" in parts:
        prior_prompts = prompt_set(args.pairs, "base")
        base_prior = rates_of(bench.images(base, prior_prompts), prior_prompts)
        progress(f"base on base prompts: {base_prior.summary()}")

    curves: dict[str, list[float]] = {}
    rows = []
    for concept in concepts:
        progress(f"concept {concept.name}")
        trained = bench.train(concept, settings, "default")
        if args.keep_loras is not None:  # the shipped built-in LoRAs are the ones measured here
            args.keep_loras.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(trained.path, args.keep_loras / trained.path.name)
        lora = load_lora(trained.path)
        row = {"concept": concept, "trained": trained}
        if "curve" in parts:
            rates, grid_rows = [], [[] for _ in range(GRID_SEEDS)]
            for strength in STRENGTHS:
                rate, images = bench.rate(base.with_lora(lora, strength, strength), concept)
                rates.append(rate)
                for seed in range(GRID_SEEDS):
                    grid_rows[seed].append(images[seed])
                progress(f"  strength {strength:g}: {rate:.1%}")
            curves[concept.name] = rates
            row["grid"] = image_grid(
                grid_rows,
                row_labels=[f"seed {seed}" for seed in range(GRID_SEEDS)],
                column_labels=[f"strength {s:g}" for s in STRENGTHS],
                upscale=2,
                label_width=60,
            )
        if "prior" in parts:
            prior_prompts = prompt_set(args.pairs, "base")
            row["prior"] = rates_of(bench.images(base.with_lora(lora, 1.0, 1.0), prior_prompts), prior_prompts)
            progress(f"  base prompts with the LoRA: {row['prior'].summary()}")
        if "fuse" in parts:
            applied_rate, applied = bench.rate(base.with_lora(lora, 1.0, 1.0), concept)
            fused_path = scratch / f"{concept.slug}-fused.safetensors"
            base.with_lora(lora, 1.0, 1.0).fused_base().save(fused_path)
            fused_rate, fused = bench.rate(load_base(fused_path, dtype="fp32", device="cpu"), concept)
            same = float(np.mean([np.array_equal(a, b) for a, b in zip(applied, fused, strict=True)]))
            row["fuse"] = (applied_rate, fused_rate, same)
            progress(f"  fused, saved, loaded: {fused_rate:.1%} (applied {applied_rate:.1%}; {same:.0%} identical)")
        if "reference" in parts:
            dataset = scan_dataset(built_in_dataset(concept.dataset), resolution=settings.resolution)
            path = scratch / f"{concept.slug}-reference.safetensors"
            seconds = train_reference(base, dataset, settings, path)
            reference_rate, _ = bench.rate(base.with_lora(load_lora(path), 1.0, 1.0), concept)
            ours_rate = (
                curves[concept.name][-1]
                if concept.name in curves
                else bench.rate(base.with_lora(lora, 1.0, 1.0), concept)[0]
            )
            row["reference"] = (ours_rate, reference_rate, trained.seconds, seconds)
            progress(
                f"  reference: {reference_rate:.1%} in {seconds:.0f} s"
                f" (ours {ours_rate:.1%} in {trained.seconds:.0f} s)"
            )
        rows.append(row)

    if "curve" in parts:
        lines += [
            "### Concept rate against strength",
            "",
            f"The concept read on the main object (goal at strength 1: ≥ {GOAL_RATE:.0%}; at 0 the base's own rate).",
            "",
            "| concept | " + " | ".join(f"strength {s:g}" for s in STRENGTHS) + " | monotone | training |",
            "|---|" + "---|" * (len(STRENGTHS) + 2),
        ]
        for row in rows:
            rates = curves[row["concept"].name]
            monotone = all(b >= a for a, b in zip(rates, rates[1:], strict=False))
            cells = [pct(r) for r in rates[:-1]] + [
                f"**{pct(rates[-1])}**" if rates[-1] >= GOAL_RATE else pct(rates[-1])
            ]
            lines.append(
                f"| {row['concept'].name} | " + " | ".join(cells) + f" | {'yes' if monotone else 'no'} | "
                f"{row['trained'].seconds:.0f} s |"
            )
        lines += ["", "![concept rate vs strength](images/quality-strength-curve.png)", ""]
        for row in rows:
            slug = row["concept"].slug
            lines.append(f"![{row['concept'].name}: strength across, seeds down](images/quality-grid-{slug}.png)")
        lines.append("")

    if "prior" in parts:
        lines += [
            "### Prior preservation",
            "",
            f"Adherence on {args.pairs} ordinary base prompts (no trigger word), base alone vs with each LoRA at 1 "
            f"(goal: each attribute drops ≤ {GOAL_PRIOR_DROP * 100:.0f} points).",
            "",
            "| | " + " | ".join(ATTRIBUTES) + " |",
            "|---|" + "---|" * len(ATTRIBUTES),
            "| base alone | " + " | ".join(pct(base_prior[a]) for a in ATTRIBUTES) + " |",
        ]
        for row in rows:
            cells = []
            for attribute in ATTRIBUTES:
                drop = base_prior[attribute] - row["prior"][attribute]
                text = f"{pct(row['prior'][attribute])} ({-drop * 100:+.1f})"
                cells.append(f"**{text}**" if drop <= GOAL_PRIOR_DROP else text)
            lines.append(f"| + {row['concept'].name} LoRA | " + " | ".join(cells) + " |")
        lines.append("")

    if "fuse" in parts:
        lines += [
            "### Fused, saved and loaded again",
            "",
            "FuseLoRA (strength 1) → save (fp32) → LoadBase, against the LoRA applied at 1.",
            "",
            "| concept | applied | fused + saved + loaded | identical images |",
            "|---|---|---|---|",
        ]
        for row in rows:
            applied_rate, fused_rate, same = row["fuse"]
            lines.append(f"| {row['concept'].name} | {pct(applied_rate)} | {pct(fused_rate)} | {same:.0%} |")
        lines.append("")

    if "reference" in parts:
        lines += [
            "### Against diffusers + PEFT",
            "",
            "The same data, steps and settings through diffusers' LoRA training loop (PEFT adapter, its Gaussian "
            "init, its own shuffling and noise; latents and text embeddings computed once, as ours does); its "
            "file read by LoadLoRA. Goal: our rate ≥ theirs at ≤ their wall time. One run each: the rates differ "
            "by their random draws as well as by the trainers.",
            "",
            "| concept | ours | diffusers + PEFT | our time | their time | ratio |",
            "|---|---|---|---|---|---|",
        ]
        for row in rows:
            ours_rate, reference_rate, ours_s, reference_s = row["reference"]
            lines.append(
                f"| {row['concept'].name} | {pct(ours_rate)} | {pct(reference_rate)} | {ours_s:.0f} s | "
                f"{reference_s:.0f} s | {ours_s / reference_s:.2f}× |"
            )
        lines.append("")

    star = next((c for c in concepts if c.name == "star"), None)
    if star is not None and "split" in parts:
        trained = bench.train(star, replace(settings, train_text_encoder=True), "with-te")
        lora = load_lora(trained.path)
        lines += [
            "### U-Net strength vs text-encoder strength",
            "",
            "A star LoRA trained with the text encoder too (text-encoder LR "
            f"{settings.text_encoder_lr:g}), applied with separate strengths.",
            "",
            "| U-Net strength | text-encoder strength | concept rate |",
            "|---|---|---|",
        ]
        for unet_strength, te_strength in ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0)):
            rate, _ = bench.rate(base.with_lora(lora, unet_strength, te_strength), star)
            lines.append(f"| {unet_strength:g} | {te_strength:g} | {pct(rate)} |")
            progress(f"  split {unet_strength:g}/{te_strength:g}: {rate:.1%}")
        lines.append("")

    if star is not None and "ranks" in parts:
        lines += [
            "### Rank and targets",
            "",
            "The star LoRA at other ranks (alpha = rank) and target sets; strength 1.",
            "",
            "| rank | targets | concept rate | file size | training |",
            "|---|---|---|---|---|",
        ]
        for rank, target in RANK_STUDY:
            trained = bench.train(
                star, replace(settings, rank=rank, alpha=float(rank), target=target), f"r{rank}-{target}"
            )
            rate, _ = bench.rate(base.with_lora(load_lora(trained.path), 1.0, 1.0), star)
            size = trained.path.stat().st_size
            lines.append(f"| {rank} | {target} | {pct(rate)} | {size / 1024:.0f} KiB | {trained.seconds:.0f} s |")
            progress(f"  rank {rank} {target}: {rate:.1%}, {size / 1024:.0f} KiB")
        lines.append("")

    section = "\n".join(lines)
    print(section)
    if not args.no_doc:
        IMAGES.mkdir(parents=True, exist_ok=True)
        if curves:
            strength_curve_chart(curves).save(CURVE)
        for row in rows:
            if "grid" in row:
                row["grid"].save(IMAGES / f"quality-grid-{row['concept'].slug}.png")
        write_doc(section, HEADING)


if __name__ == "__main__":
    main()
