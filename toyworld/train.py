"""Train the toy-world SD1.5 base from scratch: VAE, then U-Net + CLIP text encoder jointly.

    python -m lora_loom.toyworld.train --out runs/toy-world [--stage all|data|vae|unet|export]

Every stage is resumable: it checkpoints to ``--out`` every ``checkpoint_every`` steps (and when interrupted
with Ctrl-C / SIGTERM) and a second run with the same ``--out`` continues where the first stopped; the
result is the same as an uninterrupted run with the same seed (RNG states are checkpointed too). Models are
the diffusers / transformers classes built from the shipped ``toy-world-sd15`` config (SD1.5 topology, small
widths); the recipe is standard latent-diffusion training: a KL autoencoder (L1 + MSE + 1e-6 KL), then
epsilon-prediction on SD1.5's noise schedule with min-SNR weighting, 10 % caption dropout for classifier-free
guidance and an EMA of the weights. ``export`` writes the EMA weights as one single-file LDM checkpoint.

Only the "base" split of :mod:`.scenes` is used: the held-out concepts (star, cyan) are never seen.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .scenes import caption, render, sample_scene

CONFIG_NAME = "toy-world-sd15"


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    image_size: int = 64
    n_images: int = 20000
    captions_per_image: int = 3
    vae_steps: int = 2000
    vae_batch: int = 16
    vae_lr: float = 5e-4
    vae_kl_weight: float = 1e-6
    unet_steps: int = 10000
    unet_batch: int = 32
    unet_lr: float = 5e-4
    warmup_steps: int = 200
    caption_dropout: float = 0.1
    snr_gamma: float = 5.0
    noise_offset: float = 0.2
    multires_noise_iterations: int = 0  # kohya sd-scripts' --multires_noise_iterations (0: off)
    multires_noise_discount: float = 0.5
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    checkpoint_every: int = 250


# ----------------------------------------------------------------------------------------------- utilities


class _StopRequests:
    """Ctrl-C / SIGTERM ask the loop to stop at the next step boundary (checkpoint, then exit), so an
    interrupted run never saves a half-applied optimizer step."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self._previous = {sig: signal.signal(sig, self._request) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _request(self, signum, frame):
        self.requested = True


def _train_loop(out: Path, stage: str, total: int, state: dict, one_step, checkpoint, stop_after: int | None) -> bool:
    """Run ``one_step() -> loss`` until ``state["step"] == total``; checkpoint every ``checkpoint_every``
    steps, at the end, and when stopped early (signal or ``stop_after`` steps in this call). Returns True
    when the stage is complete."""
    every = state["checkpoint_every"]
    bar = tqdm(total=total, initial=state["step"], desc=stage, mininterval=5)
    started = time.perf_counter() - state["elapsed"]
    done_here = 0
    try:
        with _StopRequests() as stop:
            while state["step"] < total:
                loss = one_step()
                state["step"] += 1
                state["elapsed"] = time.perf_counter() - started
                done_here += 1
                bar.update(1)
                if state["step"] % 25 == 0:
                    bar.set_postfix(loss=f"{loss:.4f}")
                    _log(out, stage, state["step"], loss, state["elapsed"])
                stopping = stop.requested or (stop_after is not None and done_here >= stop_after)
                if stopping or state["step"] % every == 0 or state["step"] == total:
                    checkpoint()
                if stopping and state["step"] < total:
                    return False
    finally:
        bar.close()
    return True


def _save_atomic(obj, path: Path) -> None:
    temporary = path.with_name(path.name + ".partial")
    torch.save(obj, temporary)
    os.replace(temporary, path)


def _log(out: Path, stage: str, step: int, loss: float, seconds: float) -> None:
    with open(out / f"{stage}_loss.csv", "a") as f:
        f.write(f"{step},{loss:.6f},{seconds:.1f}\n")


def _lr_lambda(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))  # cosine down to 10 %

    return factor


def build_models(seed: int):
    """Seeded fresh U-Net, VAE and text encoder from the shipped toy-world config."""
    from ..lora_core.sd15_models import build_components

    return build_components(CONFIG_NAME, seed=seed)


# ----------------------------------------------------------------------------------------------- data


def make_data(out: Path, recipe: Recipe) -> dict:
    """Render the training scenes and tokenize their captions once (cached in ``out/data.pt``)."""
    path = out / "data.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    from ..lora_core.tokenizer import load_clip_tokenizer

    tokenizer = load_clip_tokenizer()
    images = np.empty((recipe.n_images, recipe.image_size, recipe.image_size, 3), np.uint8)
    captions = []
    for i in tqdm(range(recipe.n_images), desc="render scenes", mininterval=2):
        rng = np.random.default_rng([recipe.seed, 0, i])
        scene = sample_scene(rng)  # base vocabulary only: held-out concepts never appear
        images[i] = np.asarray(render(scene, recipe.image_size))
        captions.extend(caption(scene, rng) for _ in range(recipe.captions_per_image))
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    data = {
        "images": torch.from_numpy(images),
        "input_ids": ids.view(recipe.n_images, recipe.captions_per_image, 77).to(torch.int32),
        "empty_ids": empty.to(torch.int32),
    }
    (out / "captions_sample.txt").write_text("\n".join(captions[:60]) + "\n")
    _save_atomic(data, path)
    return data


def _to_pixels(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ----------------------------------------------------------------------------------------------- VAE


def train_vae(out: Path, recipe: Recipe, data: dict, stop_after: int | None = None) -> bool:
    state_path = out / "vae_state.pt"
    vae = build_models(recipe.seed).vae
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(100, recipe.vae_steps))
    generator = torch.Generator().manual_seed(recipe.seed + 1)
    state = {"step": 0, "elapsed": 0.0, "checkpoint_every": recipe.checkpoint_every}
    if state_path.is_file():
        saved = torch.load(state_path, weights_only=False)
        vae.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        generator.set_state(saved["generator"])
        state.update(step=saved["step"], elapsed=saved["elapsed"])
    if state["step"] >= recipe.vae_steps:
        return True
    images = data["images"]
    vae.train()

    def one_step() -> float:
        index = torch.randint(len(images), (recipe.vae_batch,), generator=generator)
        x = _to_pixels(images[index])
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        kl = posterior.kl().mean()
        loss = F.mse_loss(reconstruction, x) + F.l1_loss(reconstruction, x) + recipe.vae_kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), recipe.grad_clip)
        optimizer.step()
        schedule.step()
        return loss.item()

    def checkpoint() -> None:
        saved = {"model": vae.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}
        saved.update(generator=generator.get_state(), step=state["step"], elapsed=state["elapsed"])
        _save_atomic(saved, state_path)

    return _train_loop(out, "vae", recipe.vae_steps, state, one_step, checkpoint, stop_after)


def load_trained_vae(out: Path, recipe: Recipe):
    vae = build_models(recipe.seed).vae
    vae.load_state_dict(torch.load(out / "vae_state.pt", weights_only=False)["model"])
    return vae.eval()


@torch.no_grad()
def rescale_latents(vae, images: torch.Tensor, scaling_factor: float) -> float:
    """Reparametrise the VAE so its latents have std 1/scaling_factor (SD1.5's 0.18215 convention).

    z' = c·z: the encoder's mean rows are multiplied by c and its log-variance shifted by 2·ln c; the
    decoder's post_quant_conv divides by c. Decoding is unchanged; returns c.
    """
    means = []
    for chunk in images.split(256):
        means.append(vae.encode(_to_pixels(chunk)).latent_dist.mean)
    std = torch.cat(means).std().item()
    c = (1.0 / scaling_factor) / std
    channels = vae.config.latent_channels
    vae.quant_conv.weight[:channels] *= c
    vae.quant_conv.bias[:channels] *= c
    vae.quant_conv.bias[channels:] += 2 * math.log(c)
    vae.post_quant_conv.weight /= c
    return c


@torch.no_grad()
def encode_latents(out: Path, vae, images: torch.Tensor) -> dict:
    path = out / "latents.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    means, stds = [], []
    for chunk in tqdm(images.split(256), desc="encode latents", mininterval=5):
        dist = vae.encode(_to_pixels(chunk)).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    latents = {"mean": torch.cat(means), "std": torch.cat(stds)}
    _save_atomic(latents, path)
    return latents


# ----------------------------------------------------------------------------------------------- U-Net


def _noise_scheduler():
    from diffusers import DDPMScheduler

    from ..lora_core.sd15_models import config_dir

    return DDPMScheduler.from_pretrained(config_dir(CONFIG_NAME), subfolder="scheduler")


def _multires_noise(noise: torch.Tensor, iterations: int, discount: float, generator) -> torch.Tensor:
    """kohya sd-scripts' multi-resolution ("pyramid") noise: extra noise at 1/2, 1/4, ... resolution, so
    low-frequency structure (here: where the object is) cannot be read off the barely-noised signal that
    SD1.5's schedule leaves at its last steps. Deterministic given ``generator``; normalised to unit std."""
    b, c, h, w = noise.shape
    for i in range(1, iterations + 1):
        hn, wn = max(1, h // 2**i), max(1, w // 2**i)
        low = torch.randn((b, c, hn, wn), generator=generator)
        noise = noise + F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False) * discount**i
        if hn == 1 or wn == 1:
            break
    return noise / noise.std()


def train_unet(
    out: Path, recipe: Recipe, data: dict, latents: dict, scaling_factor: float, stop_after: int | None = None
) -> bool:
    from diffusers.training_utils import EMAModel, compute_snr

    state_path = out / "unet_state.pt"
    components = build_models(recipe.seed)
    unet, text_encoder = components.unet, components.text_encoder
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=recipe.unet_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(recipe.warmup_steps, recipe.unet_steps))
    ema_unet = EMAModel(unet.parameters(), decay=recipe.ema_decay)
    ema_text = EMAModel(text_encoder.parameters(), decay=recipe.ema_decay)
    generator = torch.Generator().manual_seed(recipe.seed + 2)
    state = {"step": 0, "elapsed": 0.0, "checkpoint_every": recipe.checkpoint_every}
    if state_path.is_file():
        saved = torch.load(state_path, weights_only=False)
        unet.load_state_dict(saved["unet"])
        text_encoder.load_state_dict(saved["text_encoder"])
        ema_unet.load_state_dict(saved["ema_unet"])
        ema_text.load_state_dict(saved["ema_text"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        generator.set_state(saved["generator"])
        state.update(step=saved["step"], elapsed=saved["elapsed"])
    if state["step"] >= recipe.unet_steps:
        return True

    noise_scheduler = _noise_scheduler()
    n = len(latents["mean"])
    input_ids, empty_ids = data["input_ids"].long(), data["empty_ids"].long()
    unet.train()
    text_encoder.train()

    def one_step() -> float:
        b = recipe.unet_batch
        index = torch.randint(n, (b,), generator=generator)
        which = torch.randint(input_ids.shape[1], (b,), generator=generator)
        ids = input_ids[index, which]
        ids[torch.rand(b, generator=generator) < recipe.caption_dropout] = empty_ids  # for CFG
        eps = torch.randn(latents["mean"][index].shape, generator=generator)
        x0 = (latents["mean"][index] + latents["std"][index] * eps) * scaling_factor
        noise = torch.randn(x0.shape, generator=generator)
        # Offset noise (diffusers' --noise_offset): SD1.5's schedule leaves ~8 % of the signal at the last
        # steps, and a flat background's mean colour leaks through it; without the offset the model reads the
        # background off the noise instead of the prompt, and from pure noise at sampling time it guesses.
        noise = noise + recipe.noise_offset * torch.randn((b, noise.shape[1], 1, 1), generator=generator)
        if recipe.multires_noise_iterations:
            noise = _multires_noise(noise, recipe.multires_noise_iterations, recipe.multires_noise_discount, generator)
        timesteps = torch.randint(noise_scheduler.config.num_train_timesteps, (b,), generator=generator)
        noisy = noise_scheduler.add_noise(x0, noise, timesteps)
        prediction = unet(noisy, timesteps, text_encoder(ids)[0]).sample
        snr = compute_snr(noise_scheduler, timesteps)
        weight = torch.clamp(snr, max=recipe.snr_gamma) / snr  # min-SNR-gamma, epsilon target
        loss = (weight * F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, recipe.grad_clip)
        optimizer.step()
        schedule.step()
        ema_unet.step(unet.parameters())
        ema_text.step(text_encoder.parameters())
        return loss.item()

    def checkpoint() -> None:
        saved = {"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict()}
        saved.update(ema_unet=ema_unet.state_dict(), ema_text=ema_text.state_dict())
        saved.update(optimizer=optimizer.state_dict(), schedule=schedule.state_dict())
        saved.update(generator=generator.get_state(), step=state["step"], elapsed=state["elapsed"])
        _save_atomic(saved, state_path)

    return _train_loop(out, "unet", recipe.unet_steps, state, one_step, checkpoint, stop_after)


# ----------------------------------------------------------------------------------------------- export


def export(out: Path, recipe: Recipe, destination: Path, dtype: torch.dtype = torch.float16) -> Path:
    """The EMA weights + rescaled VAE as one single-file LDM checkpoint (written by our key maps)."""
    from ..lora_core.sd15_models import SD15Components, save_single_file

    components = build_models(recipe.seed)
    components.vae.load_state_dict(torch.load(out / "vae_final.pt", weights_only=True))
    state = torch.load(out / "unet_state.pt", weights_only=False)
    from diffusers.training_utils import EMAModel

    for module, key in ((components.unet, "ema_unet"), (components.text_encoder, "ema_text")):
        ema = EMAModel(module.parameters())
        ema.load_state_dict(state[key])
        ema.copy_to(module.parameters())
    timings = json.loads((out / "timings.json").read_text()) if (out / "timings.json").is_file() else {}
    metadata = {
        "modelspec.title": "LoRA Loom toy-world SD1.5",
        "lora_loom.recipe": json.dumps(asdict(recipe)),
        "lora_loom.unet_steps_done": str(state["step"]),
        "lora_loom.train_seconds": json.dumps(timings),
    }
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.with_name(destination.name + ".partial")
    save_single_file(
        SD15Components(components.unet, components.vae, components.text_encoder),
        temporary,
        dtype=dtype,
        metadata=metadata,
    )
    os.replace(temporary, destination)
    return destination


def loss_chart(out: Path, width: int = 900, height: int = 300):
    """The VAE and U-Net loss curves (raw every 25 steps, light; moving average, bold) as one PIL image."""
    from PIL import Image, ImageDraw

    chart = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(chart)
    panels = [(stage, out / f"{stage}_loss.csv") for stage in ("vae", "unet")]
    panel_width = width // len(panels)
    for k, (stage, path) in enumerate(panels):
        rows = [line.split(",") for line in path.read_text().split()] if path.is_file() else []
        x0, y0, x1, y1 = k * panel_width + 50, 25, (k + 1) * panel_width - 15, height - 30
        draw.rectangle([x0, y0, x1, y1], outline=(160, 160, 160))
        title = {"vae": "VAE: L1 + MSE + 1e-6 KL", "unet": "U-Net + text encoder: min-SNR eps MSE, offset noise"}[stage]
        draw.text((x0, 5), title, fill="black")
        if len(rows) < 2:
            continue
        steps = np.array([float(r[0]) for r in rows])
        losses = np.array([float(r[1]) for r in rows])
        window = max(1, len(losses) // 40)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        top = float(np.quantile(losses, 0.98)) * 1.05
        bottom = 0.0
        xs = (x0 + (x1 - x0) * steps / steps[-1]).tolist()
        ys = (y1 - (y1 - y0) * (np.minimum(losses, top) - bottom) / (top - bottom)).tolist()
        smooth_ys = (y1 - (y1 - y0) * (np.minimum(smooth, top) - bottom) / (top - bottom)).tolist()
        draw.line(list(zip(xs, ys, strict=True)), fill=(170, 200, 235), width=1)
        draw.line(list(zip(xs[window - 1 :], smooth_ys, strict=True)), fill=(20, 70, 160), width=2)
        draw.text((x0 - 45, y0), f"{top:.3g}", fill="black")
        draw.text((x0 - 45, y1 - 10), f"{bottom:g}", fill="black")
        draw.text((x1 - 60, y1 + 8), f"{int(steps[-1])} steps", fill="black")
    return chart


# ----------------------------------------------------------------------------------------------- driver


def _timed(timings: dict, key: str, started: float) -> None:
    timings.setdefault(key, round(time.perf_counter() - started, 1))


def run(
    out: Path, recipe: Recipe, stage: str = "all", destination: Path | None = None, stop_after: int | None = None
) -> bool:
    """Run (or resume) ``stage``; returns False if it stopped early (signal, ``stop_after`` steps) with a
    checkpoint written, True when the stage is complete."""
    out.mkdir(parents=True, exist_ok=True)
    recipe_file = out / "recipe.json"
    if recipe_file.is_file():
        # Fields a run folder predates (added to the recipe later, with defaults) do not make it another run.
        saved = json.loads(recipe_file.read_text())
        if any(asdict(recipe).get(key) != value for key, value in saved.items()):
            raise SystemExit(f"{out} holds a run with another recipe ({recipe_file}); use a new --out")
    recipe_file.write_text(json.dumps(asdict(recipe), indent=2) + "\n")
    timings_file = out / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}

    def save_timings() -> None:
        timings_file.write_text(json.dumps(timings, indent=2) + "\n")

    if stage == "export":  # needs only the trained weights, not the 260 MB of rendered data
        if destination is not None:
            export(out, recipe, destination)
            loss_chart(out).save(out / "loss.png")
        return True
    started = time.perf_counter()
    data = make_data(out, recipe)
    _timed(timings, "data_seconds", started)
    save_timings()
    if stage == "data":
        return True
    if stage in ("all", "vae"):
        if not train_vae(out, recipe, data, stop_after):
            return False
        timings["vae_seconds"] = round(torch.load(out / "vae_state.pt", weights_only=False)["elapsed"], 1)
        save_timings()
    if stage in ("all", "unet"):
        from ..lora_core.sd15_models import load_config_dicts

        scaling_factor = load_config_dicts(CONFIG_NAME)[1]["scaling_factor"]
        started = time.perf_counter()
        if not (out / "vae_final.pt").is_file():
            vae = load_trained_vae(out, recipe)
            rescale_latents(vae, data["images"][:2048], scaling_factor)
            _save_atomic(vae.state_dict(), out / "vae_final.pt")
        vae = build_models(recipe.seed).vae
        vae.load_state_dict(torch.load(out / "vae_final.pt", weights_only=True))
        latents = encode_latents(out, vae.eval(), data["images"])
        _timed(timings, "latents_seconds", started)
        save_timings()
        if not train_unet(out, recipe, data, latents, scaling_factor, stop_after):
            return False
        timings["unet_seconds"] = round(torch.load(out / "unet_state.pt", weights_only=False)["elapsed"], 1)
        save_timings()
    if stage == "all" and destination is not None:
        export(out, recipe, destination)
        loss_chart(out).save(out / "loss.png")
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lora_loom.toyworld.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="run folder (data, checkpoints, loss logs)")
    parser.add_argument("--stage", default="all", choices=("all", "data", "vae", "unet", "export"))
    parser.add_argument("--export", type=Path, help="where to write the single-file checkpoint at the end")
    parser.add_argument("--stop-after", type=int, help="checkpoint and stop after this many steps (resume later)")
    parser.add_argument("--seed", type=int, default=Recipe.seed)
    parser.add_argument("--unet-steps", type=int, default=Recipe.unet_steps)
    parser.add_argument("--vae-steps", type=int, default=Recipe.vae_steps)
    parser.add_argument("--n-images", type=int, default=Recipe.n_images)
    parser.add_argument("--multires-noise-iterations", type=int, default=Recipe.multires_noise_iterations)
    args = parser.parse_args(argv)
    recipe = Recipe(
        seed=args.seed,
        unet_steps=args.unet_steps,
        vae_steps=args.vae_steps,
        n_images=args.n_images,
        multires_noise_iterations=args.multires_noise_iterations,
    )
    if not run(args.out, recipe, args.stage, args.export, args.stop_after):
        raise SystemExit("stopped: checkpoint written; run the same command again to resume")


if __name__ == "__main__":
    main()
