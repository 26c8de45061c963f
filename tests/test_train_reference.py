"""TrainLoRA's trainer against an independent reference: diffusers' `train_text_to_image_lora.py` loop with PEFT
LoRA layers, fed the same initial factors, data order, noise and timesteps.

The reference is written here from the diffusers script (PEFT's `inject_adapter_in_model`, the scheduler's
`add_noise`, `compute_snr` and the script's min-SNR weights, `torch.optim.AdamW`, grad-norm clipping), not from
our code: only the inputs (initial factors, the epoch order, the random draws) are shared.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from lora_loom.lora_core.lora import target_module
from lora_loom.lora_core.trainable import TrainableLoRA
from lora_loom.sd15.base import load_base
from lora_loom.sd15.config_files import config_dir
from lora_loom.sd15.tokenizer import load_clip_tokenizer
from lora_loom.training.dataset import epoch_batches, hash_seed, load_pixels, scan_dataset
from lora_loom.training.settings import TrainSettings
from lora_loom.training.trainer import train_lora, training_targets

from util import write_dataset

STEPS = 20
PEFT_TARGETS = {
    "attention": (["to_q", "to_k", "to_v", "to_out.0"], ["q_proj", "k_proj", "v_proj", "out_proj"]),
    "kohya": (
        ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"],
        ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    ),
}


def reference_run(base, dataset, settings: TrainSettings):
    """diffusers' LoRA training loop with PEFT layers; returns (per-step losses, {target: (up, down)})."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr
    from peft import LoraConfig, inject_adapter_in_model

    components = base.model.components
    unet, text_encoder, vae = (copy.deepcopy(m) for m in (components.unet, components.text_encoder, components.vae))
    unet_modules, te_modules = PEFT_TARGETS[settings.target]
    config = dict(r=settings.rank, lora_alpha=settings.alpha, init_lora_weights=True)
    inject_adapter_in_model(LoraConfig(target_modules=unet_modules, **config), unet)
    if settings.train_text_encoder:
        inject_adapter_in_model(LoraConfig(target_modules=te_modules, **config), text_encoder)
    models = {"unet": unet, "text_encoder": text_encoder}

    # The same initial factors as the trainer (kohya/PEFT init from the run's seed).
    targets = training_targets(settings)
    initial = TrainableLoRA.initialized(
        {"unet": components.unet, "text_encoder": components.text_encoder},
        targets,
        rank=settings.rank,
        alpha=settings.alpha,
        seed=settings.seed,
    )
    layers = {}
    for target, adapter in initial.items():
        layer = target_module(models, target)
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(adapter.down)
            layer.lora_B["default"].weight.copy_(adapter.up)
        layers[target] = layer
    peft_modules = {name for name, _ in unet.named_modules() if name.endswith(".lora_A")}
    peft_modules |= {name for name, _ in text_encoder.named_modules() if name.endswith(".lora_A")}
    assert len(peft_modules) == len(targets)  # PEFT wrapped exactly the modules we train

    for model in (unet, text_encoder, vae):
        model.requires_grad_(False)
    unet_params = [p for t, layer in layers.items() if t.startswith("unet.") for p in _lora_params(layer)]
    te_params = [p for t, layer in layers.items() if t.startswith("text_encoder.") for p in _lora_params(layer)]
    for p in unet_params + te_params:
        p.requires_grad_(True)
    groups = [{"params": unet_params, "lr": settings.learning_rate}]
    if te_params:
        groups.append({"params": te_params, "lr": settings.text_encoder_lr})
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    scheduler = DDPMScheduler.from_pretrained(config_dir("sd15"), subfolder="scheduler")
    tokenizer = load_clip_tokenizer()

    with torch.no_grad():
        latents = [
            vae.encode(load_pixels(item)[None]).latent_dist.mode()[0] * vae.config.scaling_factor
            for item in dataset.items
        ]
    generator = torch.Generator().manual_seed(hash_seed(settings.seed, 1))
    order = epoch_batches(dataset, settings.batch_size, settings.seed, 0)
    unet.train()
    text_encoder.train(settings.train_text_encoder)
    losses = []
    for step in range(STEPS):
        epoch, position = divmod(step, len(order))
        indices = epoch_batches(dataset, settings.batch_size, settings.seed, epoch)[position]
        x0 = torch.stack([latents[i] for i in indices])
        noise = torch.randn(x0.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(indices),), generator=generator)
        noisy = scheduler.add_noise(x0, noise, timesteps)
        ids = tokenizer(
            [dataset.items[i].caption for i in indices],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        with torch.set_grad_enabled(settings.train_text_encoder):
            hidden = text_encoder(ids)[0]
        prediction = unet(noisy, timesteps, hidden).sample
        snr = compute_snr(scheduler, timesteps)
        weights = torch.stack([snr, settings.min_snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0] / snr
        loss = F.mse_loss(prediction.float(), noise.float(), reduction="none").mean(dim=[1, 2, 3]) * weights
        loss = loss.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet_params + te_params, settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    factors = {
        t: (layer.lora_B["default"].weight.detach(), layer.lora_A["default"].weight.detach())
        for t, layer in layers.items()
    }
    return losses, factors


def _lora_params(layer):
    return [layer.lora_A["default"].weight, layer.lora_B["default"].weight]


@pytest.mark.parametrize("target, train_text_encoder", [("attention", False), ("attention", True), ("kohya", True)])
def test_losses_and_factors_match_the_diffusers_peft_loop(tmp_path, target, train_text_encoder):
    base = load_base("tiny-sd15 (built-in)")
    dataset = scan_dataset(write_dataset(tmp_path / "data"), resolution=64)
    settings = TrainSettings(
        rank=4,
        alpha=8.0,
        steps=STEPS,
        learning_rate=1e-3,
        text_encoder_lr=5e-4,
        batch_size=2,
        resolution=64,
        seed=5,
        train_text_encoder=train_text_encoder,
        target=target,
    )
    ours = train_lora(base, dataset, settings, tmp_path / "loras" / "ours.safetensors")
    reference_losses, reference_factors = reference_run(base, dataset, settings)

    assert len(ours.losses) == STEPS
    torch.testing.assert_close(torch.tensor(ours.losses), torch.tensor(reference_losses), rtol=1e-4, atol=0)
    assert reference_losses[0] != reference_losses[-1]  # the loop really trained
    assert set(ours.lora.adapters) == set(reference_factors)
    moved = 0.0
    for target_name, (up, down) in reference_factors.items():
        adapter = ours.lora.adapters[target_name]
        for mine, theirs in ((adapter.up, up), (adapter.down, down)):
            assert mine.shape == theirs.shape
            scale = theirs.abs().max().item()
            assert (mine - theirs).abs().max().item() <= 1e-4 * scale, target_name
        moved = max(moved, up.abs().max().item())
    assert moved > 1e-3  # up started at zero: the factors did move
