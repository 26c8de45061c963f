"""Train the toy-world SD1.5 base from scratch: VAE, CLIP text encoder, then the U-Net.

    python -m lora_loom.toyworld.train --out runs/toy-world [--stage all|data|vae|clip|unet|export]

Every stage is resumable: it checkpoints to ``--out`` every ``checkpoint_every`` steps (and when interrupted
with Ctrl-C / SIGTERM) and a second run with the same ``--out`` continues where the first stopped; the
result is the same as an uninterrupted run with the same seed (RNG states are checkpointed too). Models are
the diffusers / transformers classes built from the shipped ``toy-world-sd15`` config (SD1.5 topology, small
widths); the recipe is SD1.5's recipe in small: a KL autoencoder (L1 + MSE + 1e-6 KL); a text encoder
trained contrastively against a small image tower (CLIP's objective); then epsilon-prediction on SD1.5's noise
schedule with the text encoder frozen, min-SNR weighting, 10 % caption dropout for classifier-free guidance
and an EMA of the U-Net. ``export`` writes the weights as one single-file LDM checkpoint. ``--device cuda``
trains on a GPU (all random draws still come from CPU generators).

The U-Net and the text encoder see only the "base" split of :mod:`.scenes`: the held-out concepts (star,
cyan) are never shown to them. The VAE may see more, as SD1.5's VAE has seen every kind of picture: with
``vae_scenes="all"`` its scenes use every shape and colour the generator draws, and with
``vae_general_images`` it also trains on general pictures (:mod:`.pictures`: random colours, polygons, curves,
textures), so that it can reconstruct what the U-Net never learned.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from tqdm.auto import tqdm

from ..files import atomic_write
from ..lora_core.state_files import load_state, save_state
from ..lora_core.training_loop import optimizer_step, resume, run_steps, save_checkpoint
from ..sd15.objective import DiffusionObjective
from .pictures import general_picture
from .scenes import COLOURS, SHAPES, caption, render, sample_scene

CONFIG_NAME = "toy-world-sd15"


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    # sha256 of a toy-world checkpoint the run fine-tunes instead of starting from seeded weights ("": from
    # scratch). Its VAE and U-Net are where those stages start; its text encoder replaces the CLIP stage.
    init_from: str = ""
    # Which of that checkpoint's parts the run starts from (space-separated): "text_encoder" alone trains a new
    # VAE and U-Net from scratch around the checkpoint's text encoder (the CLIP stage does not depend on the VAE).
    init_parts: str = "vae unet text_encoder"
    image_size: int = 64
    n_images: int = 20000
    captions_per_image: int = 3
    vae_steps: int = 2000
    vae_batch: int = 16
    # General pictures (toyworld.pictures) the VAE trains on beside the scenes, and their share of each batch:
    # so that it reconstructs what the scenes never show (held-out concepts, a LoRA's new ones). 0: scenes only.
    vae_general_images: int = 0
    vae_general_share: float = 0.5
    # Weight of an L1 loss on the images' finite differences (edges) beside L1 + MSE: these alone blur the small
    # details that tell shapes apart (star tips, square corners). 0: off.
    vae_edge_weight: float = 0.0
    # Extra weight, in L1 + MSE, of the pixels within 2 px of an edge of the target (the pixel weight there is
    # 1 + this): in flat scenes the outline is a few percent of the pixels but all of a shape's identity. 0: off.
    vae_edge_focus: float = 0.0
    # Side of the object-centred crops the VAE trains on (0: whole images), ``vae_crop_batch`` of them a step; the
    # last ``vae_whole_image_steps`` steps see whole images (``vae_batch``), so that the normalisation layers
    # settle on the size the model is used at. A 32-px crop costs a quarter of a whole image and keeps the object.
    vae_crop: int = 0
    vae_crop_batch: int = 16
    vae_whole_image_steps: int = 0
    # False: only the decoder (with post_quant_conv) trains, from the init checkpoint's VAE; the encoder and so
    # the latent space stay the checkpoint's, and with it its U-Net and every LoRA trained on it stay valid
    # (``unet_steps`` 0 keeps that U-Net as it is). How a VAE improves after the models on its latents ship.
    vae_train_encoder: bool = True
    vae_lr: float = 5e-4
    vae_kl_weight: float = 1e-6
    # The VAE's scenes: "base" (the U-Net's training scenes) or "all" (every shape and colour the generator
    # draws, the held-out ones too, as SD1.5's VAE has seen every kind of picture; the U-Net and text encoder
    # still see base scenes only). A small VAE learns star and cyan far faster from scenes than from the
    # general pictures' continuous colours and polygons alone.
    vae_scenes: str = "base"
    clip_steps: int = 1500  # contrastive pretraining of the text encoder; 0: train it jointly with the U-Net
    clip_batch: int = 256
    clip_lr: float = 5e-4
    unet_steps: int = 10000
    unet_batch: int = 32
    unet_lr: float = 5e-4
    warmup_steps: int = 200
    caption_dropout: float = 0.1
    snr_gamma: float = 5.0
    # Lower clamp of the min-SNR weight's SNR (an x0-space floor): tried against the first base's position
    # failure, whose cause was the text encoder (see train_clip); it did not help, so it is off. 0: plain min-SNR.
    snr_floor: float = 0.0
    noise_offset: float = 0.2
    multires_noise_iterations: int = 0  # kohya sd-scripts' --multires_noise_iterations (0: off)
    multires_noise_discount: float = 0.5
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    checkpoint_every: int = 250


# ----------------------------------------------------------------------------------------------- utilities


# Every file of a run (data, latents, resume states) is a pickle-free state file (lora_core.state_files):
# tensors come back on the CPU, so a run checkpointed on a GPU resumes / exports on the CPU and vice versa.


def _train_loop(out: Path, stage: str, total: int, state: dict, one_step, checkpoint, stop_after: int | None) -> bool:
    def log(step: int, loss: float, seconds: float) -> None:
        _log(out, stage, step, loss, seconds)

    return run_steps(total, state, one_step, checkpoint, stop_after=stop_after, description=stage, log=log)


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
    from ..sd15.models import build_components

    return build_components(CONFIG_NAME, seed=seed)


INIT_WEIGHTS = "init_weights.safetensors"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def place_init_weights(out: Path, checkpoint: Path) -> str:
    """Copy a toy-world checkpoint's weights into a run folder as the start of a fine-tune; its sha256.

    The run's recipe records only that hash; the checkpoint's own recipe (its metadata) is kept beside it in
    ``init_recipe.json`` and goes into the exported file, so the chain of runs stays on record.
    """
    from ..sd15.models import load_single_file

    components, _ = load_single_file(checkpoint, dtype=torch.float32)
    weights = {name: module.state_dict() for name, module in components.items()}
    digest = file_sha256(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    save_state(out / INIT_WEIGHTS, {**weights, "sha256": digest})
    with safe_open(str(checkpoint), framework="pt") as f:
        recipe = (f.metadata() or {}).get("lora_loom.recipe", "{}")
    (out / "init_recipe.json").write_text(recipe + "\n")
    return digest


def _starts_from(recipe: Recipe, part: str) -> bool:
    return bool(recipe.init_from) and part in recipe.init_parts.split()


def _init_weights(out: Path, recipe: Recipe) -> dict:
    path = out / INIT_WEIGHTS
    if not path.is_file():
        raise SystemExit(f"{out}: the recipe fine-tunes checkpoint {recipe.init_from[:12]}; pass it with --init-from")
    weights = load_state(path)
    if weights["sha256"] != recipe.init_from:
        raise SystemExit(f"{path} holds another checkpoint than the recipe's {recipe.init_from[:12]}")
    return weights


# ----------------------------------------------------------------------------------------------- data


def make_data(out: Path, recipe: Recipe) -> dict:
    """Render the training scenes and tokenize their captions once (cached in ``out/data.safetensors``)."""
    path = out / "data.safetensors"
    if path.is_file():
        return load_state(path)
    from ..sd15.tokenizer import load_clip_tokenizer

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
    save_state(path, data)
    return data


def make_general_pictures(out: Path, recipe: Recipe) -> torch.Tensor:
    """Render the VAE's general pictures once (cached in ``out/general.safetensors``); empty with none."""
    path = out / "general.safetensors"
    if path.is_file():
        return load_state(path)["images"]
    images = np.empty((recipe.vae_general_images, recipe.image_size, recipe.image_size, 3), np.uint8)
    for i in tqdm(range(recipe.vae_general_images), desc="render general pictures", mininterval=2):
        images[i] = np.asarray(general_picture(recipe.seed, i, recipe.image_size))
    pictures = torch.from_numpy(images)
    if recipe.vae_general_images:
        save_state(path, {"images": pictures})
    return pictures


def make_vae_scenes(out: Path, recipe: Recipe, data: dict) -> torch.Tensor:
    """The VAE's scenes: the base training scenes, or (``vae_scenes="all"``) as many scenes of the whole
    vocabulary, rendered once (cached in ``out/vae_scenes.safetensors``)."""
    if recipe.vae_scenes == "base":
        return data["images"]
    path = out / "vae_scenes.safetensors"
    if path.is_file():
        return load_state(path)["images"]
    images = np.empty((recipe.n_images, recipe.image_size, recipe.image_size, 3), np.uint8)
    for i in tqdm(range(recipe.n_images), desc="render VAE scenes", mininterval=2):
        rng = np.random.default_rng([recipe.seed, 3, i])  # a stream of its own (0: base scenes, 7: pictures)
        images[i] = np.asarray(render(sample_scene(rng, SHAPES, COLOURS), recipe.image_size))
    save_state(path, {"images": torch.from_numpy(images)})
    return torch.from_numpy(images)


def _to_pixels(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ----------------------------------------------------------------------------------------------- VAE


def object_crops(images: torch.Tensor, side: int, generator: torch.Generator, object_share: float = 0.85):
    """Crops of ``side`` px from uint8 (N, H, W, 3) images, each centred (where it fits) on a random pixel that
    differs from the image's corner colour (the object, in a flat scene) with probability ``object_share``,
    else on a random pixel."""
    n, height, width, _ = images.shape
    corner = images[:, :1, :1, :].int()
    foreground = (images.int() - corner).abs().amax(dim=3) > 30
    crops = []
    for i in range(n):
        ys, xs = torch.nonzero(foreground[i].cpu(), as_tuple=True)
        if len(ys) and torch.rand(1, generator=generator).item() < object_share:
            k = int(torch.randint(len(ys), (1,), generator=generator))
            cy, cx = int(ys[k]), int(xs[k])
        else:
            cy, cx = (
                int(torch.randint(height, (1,), generator=generator)),
                int(torch.randint(width, (1,), generator=generator)),
            )
        top = min(max(cy - side // 2, 0), height - side)
        left = min(max(cx - side // 2, 0), width - side)
        crops.append(images[i, top : top + side, left : left + side])
    return torch.stack(crops)


def _edge_focus(target: torch.Tensor, focus: float) -> torch.Tensor:
    """Per-pixel loss weights (N, 1, H, W): 1 + ``focus`` within 2 px of an edge of ``target`` (N, C, H, W)."""
    edges = torch.zeros_like(target[:, :1])
    edges[..., :, 1:] += target.diff(dim=3).abs().amax(dim=1, keepdim=True)
    edges[..., 1:, :] += target.diff(dim=2).abs().amax(dim=1, keepdim=True)
    near = F.max_pool2d((edges > 0.1).float(), kernel_size=5, stride=1, padding=2)
    return 1 + focus * near


def _edge_loss(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between the horizontal and vertical pixel differences of two image batches (N, C, H, W)."""
    dx = F.l1_loss(reconstruction.diff(dim=3), target.diff(dim=3))
    dy = F.l1_loss(reconstruction.diff(dim=2), target.diff(dim=2))
    return dx + dy


def train_vae(
    out: Path,
    recipe: Recipe,
    scenes: torch.Tensor,
    stop_after: int | None = None,
    device: str = "cpu",
    general: torch.Tensor | None = None,
) -> bool:
    """The autoencoder, on the scenes and (``general``, ``recipe.vae_general_share`` of each batch) pictures."""
    state_path = out / "vae_state.safetensors"
    vae = build_models(recipe.seed).vae
    if _starts_from(recipe, "vae"):
        vae.load_state_dict(_init_weights(out, recipe)["vae"])
    elif not recipe.vae_train_encoder:
        raise SystemExit(f"{out}: a decoder-only VAE run fine-tunes a checkpoint's VAE ('vae' in --init-parts)")
    vae = vae.to(device)
    if not recipe.vae_train_encoder:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    trained = [p for p in vae.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=recipe.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(100, recipe.vae_steps))
    generator = torch.Generator().manual_seed(recipe.seed + 1)
    state = {"step": 0, "elapsed": 0.0, "checkpoint_every": recipe.checkpoint_every}
    parts = {"model": vae, "optimizer": optimizer, "schedule": schedule}
    resume(state_path, parts, generator, state)
    if state["step"] >= recipe.vae_steps:
        return True
    images = scenes.to(device)
    general = general.to(device) if general is not None and len(general) else None
    cropped_steps = recipe.vae_steps - recipe.vae_whole_image_steps if recipe.vae_crop else 0
    vae.train()
    if not recipe.vae_train_encoder:
        vae.encoder.eval()  # frozen: its latents must stay what the U-Net was trained on

    def one_step() -> float:
        # Random draws come from one CPU generator on every device, so a run's data order and noise do not
        # depend on where it trains (the arithmetic still differs between devices, in the last bits).
        cropped = state["step"] < cropped_steps
        size = recipe.vae_crop_batch if cropped else recipe.vae_batch
        n_general = round(size * recipe.vae_general_share) if general is not None else 0
        index = torch.randint(len(images), (size - n_general,), generator=generator)
        batch = images[index.to(device)]
        if n_general:
            picked = torch.randint(len(general), (n_general,), generator=generator)
            batch = torch.cat([batch, general[picked.to(device)]])
        if cropped:
            batch = object_crops(batch, recipe.vae_crop, generator)
        x = _to_pixels(batch)
        with torch.set_grad_enabled(recipe.vae_train_encoder):
            posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample  # CPU draws, moved over
        kl = posterior.kl().mean()
        if recipe.vae_edge_focus:
            weight = _edge_focus(x, recipe.vae_edge_focus)
            error = reconstruction - x
            loss = (error.square() * weight).mean() + (error.abs() * weight).mean()
        else:
            loss = F.mse_loss(reconstruction, x) + F.l1_loss(reconstruction, x)
        loss = loss + recipe.vae_kl_weight * kl
        if recipe.vae_edge_weight:
            loss = loss + recipe.vae_edge_weight * _edge_loss(reconstruction, x)
        optimizer_step(loss, optimizer, schedule, trained, recipe.grad_clip)
        return loss.item()

    def checkpoint() -> None:
        save_checkpoint(state_path, parts, generator, state)

    return _train_loop(out, "vae", recipe.vae_steps, state, one_step, checkpoint, stop_after)


def load_trained_vae(out: Path, recipe: Recipe):
    vae = build_models(recipe.seed).vae
    vae.load_state_dict(load_state(out / "vae_state.safetensors")["model"])
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
def encode_latents(out: Path, vae, images: torch.Tensor, device: str = "cpu") -> dict:
    path = out / "latents.safetensors"
    if path.is_file():
        return load_state(path)
    means, stds = [], []
    vae = vae.to(device)
    for chunk in tqdm(images.split(256), desc="encode latents", mininterval=5):
        dist = vae.encode(_to_pixels(chunk.to(device))).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    latents = {"mean": torch.cat(means), "std": torch.cat(stds)}
    save_state(path, latents)
    return latents


# ----------------------------------------------------------------------------------------------- CLIP

# The image tower exists only to train the text encoder against; it is not shipped.
CLIP_VISION = dict(
    image_size=64, patch_size=8, hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4
)


def _text_transformer(text_encoder):
    # transformers < 5.6 nests the transformer under ``text_model``; later versions are flat.
    return getattr(text_encoder, "text_model", text_encoder)


def train_clip(out: Path, recipe: Recipe, data: dict, stop_after: int | None = None, device: str = "cpu") -> bool:
    """Contrastive image-caption pretraining of the text encoder (CLIP's objective, transformers' CLIPModel).

    SD1.5's text encoder came from CLIP and stayed frozen while the U-Net trained. Trained jointly with the
    U-Net from scratch instead, ours learned only what the U-Net already used: it kept colour words and
    flattened position words ("top left" vs "bottom right" moved its output ~25x less than "red" vs
    "green"), so the U-Net never learned to place objects from the prompt. A contrastive loss has to tell
    apart pictures that differ only in where the object is, so the encoder must keep position words.
    """
    from transformers import CLIPConfig, CLIPModel

    state_path = out / "clip_state.safetensors"
    text_encoder = build_models(recipe.seed).text_encoder
    config = CLIPConfig(
        text_config=text_encoder.config.to_dict(),
        vision_config=CLIP_VISION,
        projection_dim=text_encoder.config.hidden_size,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed + 3)
        model = CLIPModel(config)
    _text_transformer(model.text_model).load_state_dict(_text_transformer(text_encoder).state_dict())
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.clip_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(100, recipe.clip_steps))
    generator = torch.Generator().manual_seed(recipe.seed + 3)
    state = {"step": 0, "elapsed": 0.0, "checkpoint_every": recipe.checkpoint_every}
    parts = {"model": model, "optimizer": optimizer, "schedule": schedule}
    resume(state_path, parts, generator, state)

    def save_text_encoder() -> None:
        _text_transformer(text_encoder).load_state_dict(_text_transformer(model.text_model).state_dict())
        save_state(out / "text_encoder_clip.safetensors", text_encoder.state_dict())

    if state["step"] >= recipe.clip_steps:
        if not (out / "text_encoder_clip.safetensors").is_file():
            save_text_encoder()
        return True
    images, input_ids = data["images"], data["input_ids"]
    eos = int(data["empty_ids"][-1])  # SD1.5's tokenizer pads with <|endoftext|>
    model.train()

    def one_step() -> float:
        b = recipe.clip_batch
        index = torch.randint(len(images), (b,), generator=generator)
        which = torch.randint(input_ids.shape[1], (b,), generator=generator)
        ids = input_ids[index, which].long()
        # Up to the first <|endoftext|> (CLIP's pooled token): attention is causal, so the padding after it
        # changes nothing in the loss and need not be computed.
        ids = ids[:, : int((ids != eos).sum(dim=1).max()) + 1]
        pixels = _to_pixels(images[index])
        loss = model(input_ids=ids.to(device), pixel_values=pixels.to(device), return_loss=True).loss
        optimizer_step(loss, optimizer, schedule, model.parameters(), recipe.grad_clip)
        return loss.item()

    def checkpoint() -> None:
        save_checkpoint(state_path, parts, generator, state)

    done = _train_loop(out, "clip", recipe.clip_steps, state, one_step, checkpoint, stop_after)
    if done:
        save_text_encoder()
    return done


# ----------------------------------------------------------------------------------------------- U-Net


def train_unet(
    out: Path,
    recipe: Recipe,
    data: dict,
    latents: dict,
    scaling_factor: float,
    stop_after: int | None = None,
    device: str = "cpu",
) -> bool:
    from diffusers.training_utils import EMAModel

    state_path = out / "unet_state.safetensors"
    components = build_models(recipe.seed)
    if _starts_from(recipe, "unet"):
        components.unet.load_state_dict(_init_weights(out, recipe)["unet"])
    unet, text_encoder = components.unet.to(device), components.text_encoder.to(device)
    joint = recipe.clip_steps == 0  # without a CLIP stage the text encoder trains here, from scratch
    if not joint:  # SD1.5's way: the CLIP-trained text encoder stays frozen
        text_encoder.load_state_dict(load_state(out / "text_encoder_clip.safetensors"))
        text_encoder.requires_grad_(False)
    trained = {"unet": unet, "text": text_encoder} if joint else {"unet": unet}
    parameters = [p for module in trained.values() for p in module.parameters()]
    # The models are small, so on a GPU the step is bound by kernel launches: one fused optimizer kernel and
    # multi-tensor EMA updates instead of one launch per parameter.
    fused = torch.device(device).type == "cuda"
    optimizer = torch.optim.AdamW(parameters, lr=recipe.unet_lr, weight_decay=0.0, fused=fused or None)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(recipe.warmup_steps, recipe.unet_steps))
    emas = {name: EMAModel(m.parameters(), decay=recipe.ema_decay, foreach=True) for name, m in trained.items()}
    generator = torch.Generator().manual_seed(recipe.seed + 2)
    state = {"step": 0, "elapsed": 0.0, "checkpoint_every": recipe.checkpoint_every}
    parts = {"unet": unet, "text_encoder": text_encoder, **{f"ema_{name}": ema for name, ema in emas.items()}}
    parts.update(optimizer=optimizer, schedule=schedule)
    resume(state_path, parts, generator, state)
    for ema in emas.values():
        ema.to(device)  # checkpoints are loaded onto the CPU
    if state["step"] >= recipe.unet_steps:
        return True

    objective = DiffusionObjective.for_config(
        CONFIG_NAME,
        min_snr_gamma=recipe.snr_gamma,
        snr_floor=recipe.snr_floor,
        noise_offset=recipe.noise_offset,
        multires_iterations=recipe.multires_noise_iterations,
        multires_discount=recipe.multires_noise_discount,
    )
    n = len(latents["mean"])
    latent_mean, latent_std = latents["mean"].to(device), latents["std"].to(device)
    input_ids, empty_ids = data["input_ids"].long(), data["empty_ids"].long()
    unet.train()
    text_encoder.train(joint)

    def one_step() -> float:
        b = recipe.unet_batch
        index = torch.randint(n, (b,), generator=generator)
        which = torch.randint(input_ids.shape[1], (b,), generator=generator)
        ids = input_ids[index, which]
        ids[torch.rand(b, generator=generator) < recipe.caption_dropout] = empty_ids  # for CFG
        shape = (b, *latent_mean.shape[1:])
        eps = torch.randn(shape, generator=generator)
        on_device = index.to(device)
        x0 = (latent_mean[on_device] + latent_std[on_device] * eps.to(device)) * scaling_factor
        # Offset noise (diffusers' --noise_offset): without it the model reads a flat background's mean colour
        # off the barely-noised signal of the last steps instead of from the prompt.
        noise = objective.noise(shape, generator)
        timesteps = objective.timesteps(b, generator)
        noise, timesteps = noise.to(device), timesteps.to(device)
        noisy = objective.noisy(x0, noise, timesteps)
        with torch.set_grad_enabled(joint):
            context = text_encoder(ids.to(device))[0]
        prediction = unet(noisy, timesteps, context).sample
        loss = objective.loss(prediction, x0, noise, timesteps)
        optimizer_step(loss, optimizer, schedule, parameters, recipe.grad_clip)
        for name, ema in emas.items():
            ema.step(trained[name].parameters())
        return loss.item()

    def checkpoint() -> None:
        save_checkpoint(state_path, parts, generator, state)

    return _train_loop(out, "unet", recipe.unet_steps, state, one_step, checkpoint, stop_after)


# ----------------------------------------------------------------------------------------------- export


def export(out: Path, recipe: Recipe, destination: Path, dtype: torch.dtype = torch.float16) -> Path:
    """The EMA weights + rescaled VAE as one single-file LDM checkpoint (written by our key maps)."""
    from ..sd15.models import SD15Components, save_single_file

    components = build_models(recipe.seed)
    components.vae.load_state_dict(load_state(out / "vae_final.safetensors"))
    if recipe.unet_steps:
        state = load_state(out / "unet_state.safetensors")
    else:  # the init checkpoint's U-Net and text encoder, untouched
        init = _init_weights(out, recipe)
        state = {"step": 0, "unet": init["unet"], "text_encoder": init["text_encoder"]}
        components.unet.load_state_dict(state["unet"])
    from diffusers.training_utils import EMAModel

    components.text_encoder.load_state_dict(state["text_encoder"])  # frozen (CLIP stage): no EMA of it
    for module, key in ((components.unet, "ema_unet"), (components.text_encoder, "ema_text")):
        if key not in state:
            continue
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
    if recipe.init_from:  # a fine-tune: the recipe of the checkpoint it started from, too
        metadata["lora_loom.init_recipe"] = (out / "init_recipe.json").read_text().strip()
    parts = SD15Components(components.unet, components.vae, components.text_encoder)
    return atomic_write(
        destination, lambda temporary: save_single_file(parts, temporary, dtype=dtype, metadata=metadata)
    )


def loss_chart(out: Path, width: int = 1200, height: int = 300):
    """The loss curves of the stages that ran (raw every 25 steps, light; moving average, bold), one image."""
    from PIL import Image, ImageDraw

    chart = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(chart)
    stages = [stage for stage in ("vae", "clip", "unet") if (out / f"{stage}_loss.csv").is_file()] or ["vae", "unet"]
    panels = [(stage, out / f"{stage}_loss.csv") for stage in stages]
    panel_width = width // len(panels)
    for k, (stage, path) in enumerate(panels):
        rows = [line.split(",") for line in path.read_text().split()] if path.is_file() else []
        x0, y0, x1, y1 = k * panel_width + 50, 25, (k + 1) * panel_width - 15, height - 30
        draw.rectangle([x0, y0, x1, y1], outline=(160, 160, 160))
        title = {
            "vae": "VAE: L1 + MSE + 1e-6 KL",
            "clip": "text encoder: CLIP contrastive loss",
            "unet": "U-Net: min-SNR eps MSE, offset noise",
        }[stage]
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
    out: Path,
    recipe: Recipe,
    stage: str = "all",
    destination: Path | None = None,
    stop_after: int | None = None,
    device: str = "cpu",
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
        general = make_general_pictures(out, recipe)
        if not train_vae(out, recipe, make_vae_scenes(out, recipe, data), stop_after, device, general):
            return False
        timings["vae_seconds"] = round(load_state(out / "vae_state.safetensors")["elapsed"], 1)
        save_timings()
    if stage in ("all", "clip") and _starts_from(recipe, "text_encoder"):  # keeps the checkpoint's text encoder
        save_state(out / "text_encoder_clip.safetensors", _init_weights(out, recipe)["text_encoder"])
    elif stage in ("all", "clip") and recipe.clip_steps:
        if not train_clip(out, recipe, data, stop_after, device):
            return False
        timings["clip_seconds"] = round(load_state(out / "clip_state.safetensors")["elapsed"], 1)
        save_timings()
    if stage in ("all", "unet"):
        if recipe.clip_steps and not (out / "text_encoder_clip.safetensors").is_file():
            raise SystemExit(f"{out}: the U-Net stage needs the CLIP stage's text encoder; run --stage clip first")
        from ..sd15.config_files import load_config_dicts

        scaling_factor = load_config_dicts(CONFIG_NAME)[1]["scaling_factor"]
        started = time.perf_counter()
        if not (out / "vae_final.safetensors").is_file():
            vae = load_trained_vae(out, recipe)
            if recipe.vae_train_encoder:  # a frozen encoder keeps the checkpoint's (already rescaled) latents
                rescale_latents(vae, data["images"][:2048], scaling_factor)
            save_state(out / "vae_final.safetensors", vae.state_dict())
        if recipe.unet_steps:  # 0: the init checkpoint's U-Net as it is (after a decoder-only VAE run)
            vae = build_models(recipe.seed).vae
            vae.load_state_dict(load_state(out / "vae_final.safetensors"))
            latents = encode_latents(out, vae.eval(), data["images"], device)
            _timed(timings, "latents_seconds", started)
            save_timings()
            if not train_unet(out, recipe, data, latents, scaling_factor, stop_after, device):
                return False
            timings["unet_seconds"] = round(load_state(out / "unet_state.safetensors")["elapsed"], 1)
            save_timings()
    if stage == "all" and destination is not None:
        export(out, recipe, destination)
        loss_chart(out).save(out / "loss.png")
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lora_loom.toyworld.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="run folder (data, checkpoints, loss logs)")
    parser.add_argument("--stage", default="all", choices=("all", "data", "vae", "clip", "unet", "export"))
    parser.add_argument("--export", type=Path, help="where to write the single-file checkpoint at the end")
    parser.add_argument("--stop-after", type=int, help="checkpoint and stop after this many steps (resume later)")
    parser.add_argument("--seed", type=int, default=Recipe.seed)
    parser.add_argument("--unet-steps", type=int, default=Recipe.unet_steps)
    parser.add_argument("--vae-steps", type=int, default=Recipe.vae_steps)
    parser.add_argument("--n-images", type=int, default=Recipe.n_images)
    parser.add_argument("--vae-general-images", type=int, default=Recipe.vae_general_images)
    parser.add_argument("--vae-general-share", type=float, default=Recipe.vae_general_share)
    parser.add_argument("--vae-edge-weight", type=float, default=Recipe.vae_edge_weight)
    parser.add_argument("--vae-edge-focus", type=float, default=Recipe.vae_edge_focus)
    parser.add_argument("--vae-crop", type=int, default=Recipe.vae_crop, help="crop side for the VAE (0: whole images)")
    parser.add_argument("--vae-crop-batch", type=int, default=Recipe.vae_crop_batch)
    parser.add_argument("--vae-whole-image-steps", type=int, default=Recipe.vae_whole_image_steps)
    parser.add_argument("--multires-noise-iterations", type=int, default=Recipe.multires_noise_iterations)
    parser.add_argument("--snr-floor", type=float, default=Recipe.snr_floor)
    parser.add_argument("--clip-steps", type=int, default=Recipe.clip_steps, help="0: no CLIP stage")
    parser.add_argument("--vae-scenes", choices=("base", "all"), default=Recipe.vae_scenes)
    parser.add_argument("--vae-lr", type=float, default=Recipe.vae_lr)
    parser.add_argument(
        "--vae-decoder-only",
        action="store_true",
        help="fine-tune only the VAE's decoder (the latent space, and so the U-Net and its LoRAs, stay valid)",
    )
    parser.add_argument("--unet-lr", type=float, default=Recipe.unet_lr)
    parser.add_argument("--caption-dropout", type=float, default=Recipe.caption_dropout)
    parser.add_argument(
        "--init-from", type=Path, help="fine-tune this toy-world checkpoint instead of training from scratch"
    )
    parser.add_argument(
        "--init-parts",
        default=Recipe.init_parts,
        help="which parts of --init-from to start from, space-separated (e.g. 'text_encoder': new VAE and U-Net)",
    )
    parser.add_argument("--device", default="cpu", help="torch device to train on, e.g. cuda (default: cpu)")
    args = parser.parse_args(argv)
    unknown = set(args.init_parts.split()) - {"vae", "unet", "text_encoder"}
    if unknown:
        parser.error(f"--init-parts: unknown part(s) {sorted(unknown)}; choose from vae, unet, text_encoder")
    parts = set(args.init_parts.split()) if args.init_from is not None else set()
    if args.vae_decoder_only and "vae" not in parts:
        parser.error("--vae-decoder-only fine-tunes a checkpoint's VAE: pass --init-from with 'vae' in --init-parts")
    if args.unet_steps == 0 and not {"unet", "text_encoder"} <= parts:
        parser.error("--unet-steps 0 keeps a checkpoint's U-Net and text encoder: pass --init-from with both parts")
    init_from = place_init_weights(args.out, args.init_from) if args.init_from is not None else ""
    recipe = Recipe(
        init_from=init_from,
        init_parts=args.init_parts,
        vae_lr=args.vae_lr,
        vae_train_encoder=not args.vae_decoder_only,
        unet_lr=args.unet_lr,
        caption_dropout=args.caption_dropout,
        seed=args.seed,
        unet_steps=args.unet_steps,
        vae_steps=args.vae_steps,
        n_images=args.n_images,
        vae_general_images=args.vae_general_images,
        vae_general_share=args.vae_general_share,
        vae_edge_weight=args.vae_edge_weight,
        vae_edge_focus=args.vae_edge_focus,
        vae_crop=args.vae_crop,
        vae_crop_batch=args.vae_crop_batch,
        vae_whole_image_steps=args.vae_whole_image_steps,
        vae_scenes=args.vae_scenes,
        multires_noise_iterations=args.multires_noise_iterations,
        snr_floor=args.snr_floor,
        clip_steps=args.clip_steps,
    )
    if not run(args.out, recipe, args.stage, args.export, args.stop_after, args.device):
        raise SystemExit("stopped: checkpoint written; run the same command again to resume")


if __name__ == "__main__":
    main()
