"""Train a LoRA on an SD1.5 base handle: base + dataset + settings (+ progress and stop callbacks) → `LoRA` + file.

The loop is diffusers' `train_text_to_image_lora.py` with kohya's defaults: the LoRA's factors (kohya/PEFT init:
down Kaiming-uniform, up zero) run in the model's forward through hooks (`lora_core.injection`), on top of
whatever the handle carries (applied and fused LoRAs); the objective is the shared `sd15.objective`; the
optimizer AdamW; the schedule diffusers' `get_scheduler`. Nothing in the shared model changes: the hooks come
off, modes and gradient checkpointing are restored, and the weights are never written.

Resumable: the state (factors, optimizer, schedule, grad scaler, RNG, step, loss history) is checkpointed
pickle-free next to the output (`<name>.train-state`) every `CHECKPOINT_EVERY` steps and when stopped; the same
run started again resumes bitwise; a finished identical run returns its file without training.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.hooks import RemovableHandle

from ..lora_core.formats import load_lora
from ..lora_core.injection import lora_in_forward
from ..lora_core.lora import LoRA
from ..lora_core.state_files import StateFileError, load_state, save_state
from ..lora_core.targets import kohya_targets
from ..lora_core.trainable import TrainableLoRA
from ..lora_core.training_loop import optimizer_step, restore, run_steps, save_checkpoint
from ..lora_core.writer import save_lora, tensor_data_hash
from ..sd15.base import SDBase
from ..sd15.objective import DiffusionObjective
from .dataset import Dataset, epoch_batches, hash_seed
from .encoded import EncodeCounts, encode_captions, encode_latents
from .heap import HeapBound, training_heap
from .loss_chart import smoothed
from .metadata import training_metadata
from .settings import TrainSettings

log = logging.getLogger("lora_loom.train")

CHECKPOINT_EVERY = 100  # steps between resume states (and always when stopped)
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingError(RuntimeError):
    """Training could not go on (the message says why and what to change)."""


class TrainingInterrupted(TrainingError):
    """Stopped at a step boundary on request; the state is saved and the same run resumes from it."""

    def __init__(self, step: int, total: int) -> None:
        super().__init__(f"interrupted at step {step}/{total}; run the same workflow again to resume")
        self.step, self.total = step, total


@dataclass(frozen=True)
class StepInfo:
    """What the progress callback gets after each step (also the host's `lora_loom.train` message)."""

    step: int
    total: int
    loss: float
    loss_ema: float
    lr: float
    eta_s: float
    validation: Path | None = None  # the newest validation sample, if any


@dataclass
class TrainResult:
    lora: LoRA
    path: Path
    steps: int
    losses: list[float]
    lrs: list[float]
    reused: bool = False  # a finished identical run: the file was returned, nothing trained
    resumed_from: int = 0
    notes: list[str] = field(default_factory=list)
    validation_images: list[Path] = field(default_factory=list)

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None


def state_path_for(output: Path) -> Path:
    """Where a run writing `output` keeps its resume state (an extension no LoRA list shows)."""
    return output.with_name(output.stem + ".train-state")


def intermediate_path(output: Path, step: int) -> Path:
    return output.with_name(f"{output.stem}-step{step:08d}{output.suffix}")


def training_targets(settings: TrainSettings) -> list[str]:
    """`attention`: U-Net to_q/k/v/out.0 (+ text-encoder q/k/v/out_proj); `kohya`: every kohya SD1.5 target."""
    targets = kohya_targets("attention" if settings.target == "attention" else "all")
    return [t for t in targets if settings.train_text_encoder or t.startswith("unet.")]


def run_key(base: SDBase, dataset: Dataset, settings: TrainSettings) -> str:
    """What decides the trained numbers: settings, data, and the base as the handle carries it."""
    parts = (settings.run_key(), dataset.key(), *(base.state_key(c) for c in ("unet", "text_encoder", "vae")))
    return hashlib.sha256(repr(parts).encode()).hexdigest()


class _History:
    """The per-step record (a resumable part): loss, learning rate."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.lrs: list[float] = []

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "lrs": list(self.lrs)}

    def load_state_dict(self, state: dict) -> None:
        self.losses, self.lrs = list(state["losses"]), list(state["lrs"])


class _RunRecord:
    """Which run a state file belongs to, and whether it finished (and with which file)."""

    def __init__(self, key: str) -> None:
        self.key, self.finished, self.file_hash = key, False, ""

    def state_dict(self) -> dict:
        return {"key": self.key, "finished": self.finished, "file_hash": self.file_hash}

    def load_state_dict(self, state: dict) -> None:
        self.key, self.finished, self.file_hash = state["key"], state["finished"], state["file_hash"]


def _read_record(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return load_state(path)
    except StateFileError as error:
        log.warning("TrainLoRA: ignoring an unreadable resume state (%s); starting fresh", error)
        return None


def _file_hash(path: Path) -> str:
    return tensor_data_hash(path.read_bytes())


def _make_optimizer(settings: TrainSettings, groups: list[dict]) -> torch.optim.Optimizer:
    if settings.optimizer == "AdamW8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise TrainingError(
                "optimizer AdamW8bit needs the bitsandbytes package, which is not installed "
                "(pip install bitsandbytes), or choose AdamW"
            ) from None
        return bitsandbytes.optim.AdamW8bit(groups, weight_decay=0.01)
    return torch.optim.AdamW(groups, weight_decay=0.01)


def _make_schedule(settings: TrainSettings, optimizer: torch.optim.Optimizer):
    from diffusers.optimization import get_scheduler

    name = settings.lr_scheduler
    if name == "constant" and settings.warmup_steps:
        name = "constant_with_warmup"  # diffusers' "constant" ignores warmup
    return get_scheduler(name, optimizer, num_warmup_steps=settings.warmup_steps, num_training_steps=settings.steps)


def _is_out_of_memory(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


# U-Net levels (from the full resolution down) whose blocks gradient checkpointing recomputes. The deeper levels'
# activations are small (a 16th of the first level's per tensor and less) while their recomputation is the most
# costly part of it (the largest weights: SD1.5's 1280-channel convs are re-read and reordered on every call), so
# they keep their activations. Measured in bench/bench_train.py (full-size SD1.5, 256²).
CHECKPOINTED_LEVELS = 2


def _checkpointing_on(unet: torch.nn.Module, heap_bound: HeapBound | None) -> list[RemovableHandle]:
    """diffusers' gradient checkpointing on the first `CHECKPOINTED_LEVELS` levels' blocks only; a `heap_bound`
    applied where every U-Net block starts (checkpointed ones: by the checkpoint function; the deeper ones: by
    hooks, returned for removal). `unet.disable_gradient_checkpointing()` turns all of it off again."""
    unet.enable_gradient_checkpointing(heap_bound.checkpointing_func() if heap_bound is not None else None)
    levels = len(unet.down_blocks)
    deep = [*unet.down_blocks[CHECKPOINTED_LEVELS:], unet.mid_block, *unet.up_blocks[: levels - CHECKPOINTED_LEVELS]]
    handles = []
    for block in (block for block in deep if block is not None):
        for module in block.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = False
        if heap_bound is not None:
            for part in [*getattr(block, "resnets", []), *(getattr(block, "attentions", None) or [])]:
                handles.extend(heap_bound.watch(part))
    return handles


@contextlib.contextmanager
def _training_modes(base: SDBase, settings: TrainSettings, heap_bound: HeapBound | None = None) -> Iterator[None]:
    """Train mode and (optionally) gradient checkpointing (see `_checkpointing_on`) on the shared modules,
    restored afterwards."""
    unet, text_encoder = base.model.components.unet, base.model.components.text_encoder
    modes = {module: module.training for module in (unet, text_encoder)}
    # transformers renamed gradient_checkpointing_* to activation_checkpointing_* (5.x; the old names warn).
    te_enable = getattr(text_encoder, "activation_checkpointing_enable", text_encoder.gradient_checkpointing_enable)
    te_disable = getattr(text_encoder, "activation_checkpointing_disable", text_encoder.gradient_checkpointing_disable)
    te_checkpointing = settings.gradient_checkpointing and settings.train_text_encoder
    handles: list[RemovableHandle] = []
    try:
        unet.train()
        text_encoder.train(settings.train_text_encoder)
        if settings.gradient_checkpointing:
            handles = _checkpointing_on(unet, heap_bound)
        if te_checkpointing:
            te_enable()
        yield
    finally:
        for handle in handles:
            handle.remove()
        if settings.gradient_checkpointing:
            unet.disable_gradient_checkpointing()
        if te_checkpointing:
            te_disable()
            # Enabling also hooks the token embedding so its output requires grad; disabling leaves that hook.
            text_encoder.disable_input_require_grads()
        for module, training in modes.items():
            module.train(training)


def train_lora(
    base: SDBase,
    dataset: Dataset,
    settings: TrainSettings,
    output: Path,
    *,
    name: str | None = None,
    progress: Callable[[StepInfo], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train, write `output` (kohya format, atomically) and return the LoRA.

    `progress(StepInfo)` runs after every step (a host's cancel point: if it raises, the state is saved
    first); `should_stop()` asks for a stop at the next step boundary; `stop_after` stops after that many
    steps in this call (tests). Stopping raises `TrainingInterrupted` after saving. With a validation prompt,
    a fixed-seed sample with the LoRA-in-training is saved next to the output every
    `validation_every_n_steps` (`<name>-validation-step00000100.png`; the newest in `StepInfo.validation`).
    """
    output = Path(output)
    name = name or output.stem
    model = base.model
    key = run_key(base, dataset, settings)
    state_path = state_path_for(output)
    notes: list[str] = list(dataset.notes)

    saved = _read_record(state_path)
    if saved is not None and saved.get("run", {}).get("key") != key:
        log.info("TrainLoRA: %s holds a different run (other inputs): starting a fresh run", state_path.name)
        notes.append("different inputs than the saved run: trained from the start")
        saved = None
    if saved is not None and saved["run"]["finished"]:
        if output.is_file() and _file_hash(output) == saved["run"]["file_hash"]:
            log.info("TrainLoRA: %s is this very run, already finished: returning it, nothing trained", output.name)
            history = saved["history"]
            lora = load_lora(output, name=name)
            return TrainResult(lora, output, settings.steps, history["losses"], history["lrs"], reused=True)
        saved = None  # the file is gone or was replaced: train it again

    components = {"unet": model.components.unet, "text_encoder": model.components.text_encoder}
    targets = training_targets(settings)
    trainable = TrainableLoRA.initialized(
        components, targets, rank=settings.rank, alpha=settings.alpha, seed=settings.seed, name=name
    )
    if settings.use_rslora:
        for _, adapter in trainable.items():
            adapter.rank_scaling = "sqrt"
    trainable.to(model.device)
    unet_parameters = [p for t, a in trainable.items() if t.startswith("unet.") for p in a.parameters()]
    te_parameters = [p for t, a in trainable.items() if t.startswith("text_encoder.") for p in a.parameters()]
    groups = [{"params": unet_parameters, "lr": settings.learning_rate}]
    if te_parameters:
        groups.append({"params": te_parameters, "lr": settings.text_encoder_lr})
    optimizer = _make_optimizer(settings, groups)
    schedule = _make_schedule(settings, optimizer)
    scaler = torch.amp.GradScaler(model.device.type) if settings.mixed_precision == "fp16" else None

    history, record = _History(), _RunRecord(key)
    generator = torch.Generator().manual_seed(hash_seed(settings.seed, 1))
    state = {"step": 0, "elapsed": 0.0, "checkpoint_every": CHECKPOINT_EVERY}
    parts = {"lora": trainable, "optimizer": optimizer, "schedule": schedule, "history": history, "run": record}
    if scaler is not None:
        parts["scaler"] = scaler
    if saved is not None:  # the state file was read above: restore from it rather than read it again
        restore(saved, parts, generator, state)
        notes.append(f"resumed from step {state['step']}/{settings.steps}")
        log.info("TrainLoRA: resuming %s from step %d/%d", name, state["step"], settings.steps)
    resumed_from = state["step"]
    saved_at = [resumed_from if resumed_from else None]  # the step of the newest resume state on disk

    from diffusers import DDPMScheduler

    objective = DiffusionObjective(
        DDPMScheduler.from_config(model.scheduler_config),
        min_snr_gamma=settings.min_snr_gamma,
        noise_offset=settings.noise_offset,
    )
    latent_counts, caption_counts = EncodeCounts(), EncodeCounts()
    batches_per_epoch = len(epoch_batches(dataset, settings.batch_size, settings.seed, 0))
    validation_images: list[Path] = []

    with model.lock:
        base.activate()
        latents = encode_latents(dataset, model.components.vae, base.state_key("vae"), latent_counts)
        tokenizer = _tokenizer(base)
        text_encoder = model.components.text_encoder

        def token_ids(captions: list[str]) -> torch.Tensor:
            return tokenizer(
                captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
            ).input_ids

        embeddings = {}
        if not settings.train_text_encoder:
            embeddings = encode_captions(
                [item.caption for item in dataset.items],
                lambda caption: text_encoder(token_ids([caption]).to(model.device))[0][0],
                base.state_key("text_encoder"),
                caption_counts,
            )
        encoded = f"latents {latent_counts}" + (f"; captions {caption_counts}" if embeddings else "")
        notes.append(f"dataset: {len(dataset.items)} images ({dataset.num_train_images} with repeats); {encoded}")
        log.info("TrainLoRA: %s", notes[-1])

        epoch_cache: dict[int, list[list[int]]] = {}
        unet = model.components.unet
        parameters = unet_parameters + te_parameters
        autocast = _AUTOCAST.get(settings.mixed_precision)

        def one_step() -> float:
            step = state["step"]
            epoch, position = divmod(step, batches_per_epoch)
            if epoch not in epoch_cache:
                epoch_cache.clear()
                epoch_cache[epoch] = epoch_batches(dataset, settings.batch_size, settings.seed, epoch)
            indices = epoch_cache[epoch][position]
            x0 = torch.stack([latents[i] for i in indices])
            noise = objective.noise(tuple(x0.shape), generator)
            timesteps = objective.timesteps(len(indices), generator)
            x0, noise, timesteps = x0.to(model.device), noise.to(model.device), timesteps.to(model.device)
            noisy = objective.noisy(x0, noise, timesteps)
            captions = [dataset.items[i].caption for i in indices]
            try:
                with torch.autocast(model.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                    if settings.train_text_encoder:
                        context = text_encoder(token_ids(captions).to(model.device))[0]
                    else:
                        context = torch.stack([embeddings[c] for c in captions]).to(model.device)
                    prediction = unet(noisy.to(unet.dtype), timesteps, context.to(unet.dtype)).sample
                loss = objective.loss(prediction, x0, noise, timesteps)
                value = loss.item()
                if not math.isfinite(value):
                    kept = (
                        f"the last good state (step {saved_at[0]}) is kept in {state_path.name}"
                        if saved_at[0] is not None
                        else f"no state was saved yet (one is saved every {CHECKPOINT_EVERY} steps)"
                    )
                    raise TrainingError(
                        f"the loss became {value} at step {step + 1}/{settings.steps}: training stopped; {kept}. "
                        "Lower learning_rate, or use mixed_precision fp32"
                    )
                optimizer_step(loss, optimizer, schedule, parameters, settings.max_grad_norm, scaler)
            except RuntimeError as error:
                if isinstance(error, TrainingError) or not _is_out_of_memory(error):
                    raise
                raise TrainingError(
                    f"out of memory at step {step + 1} ({error}): lower batch_size or resolution, "
                    "or turn on gradient_checkpointing, or use mixed_precision bf16"
                ) from None
            history.losses.append(value)
            history.lrs.append(float(schedule.get_last_lr()[0]))
            return value

        def checkpoint() -> None:
            save_checkpoint(state_path, parts, generator, state)
            saved_at[0] = state["step"]

        started = time.perf_counter()

        def on_step(step: int, loss: float) -> None:
            if settings.save_every_n_steps and step % settings.save_every_n_steps == 0 and step < settings.steps:
                _save(trainable, intermediate_path(output, step), step)
            every = settings.validation_every_n_steps
            if settings.validation_prompt.strip() and every and (step % every == 0 or step == settings.steps):
                with _sampling_modes(base):
                    validation_images.append(_validation_sample(base, settings, output, step))
            if progress is not None:
                rate = (time.perf_counter() - started) / max(1, step - resumed_from)
                lr = history.lrs[-1]
                ema = smoothed(history.losses[-200:])[-1]
                newest = validation_images[-1] if validation_images else None
                progress(StepInfo(step, settings.steps, loss, ema, lr, rate * (settings.steps - step), newest))

        def _save(lora: TrainableLoRA, path: Path, step: int) -> Path:
            metadata = training_metadata(
                settings,
                dataset,
                output_name=name,
                steps_done=step,
                epoch=math.ceil(step / batches_per_epoch),
                num_epochs=math.ceil(settings.steps / batches_per_epoch),
                base_name=Path(model.name).name,
                prediction_type=objective.prediction_type,
                run_key=key,
            )
            return save_lora(lora.freeze(name), path, metadata=metadata)

        with (
            training_heap(model.device, settings.gradient_checkpointing) as heap_bound,
            lora_in_forward(components, trainable),
            _training_modes(base, settings, heap_bound),
        ):
            finished = run_steps(
                settings.steps,
                state,
                one_step,
                checkpoint,
                stop_after=stop_after,
                description=f"TrainLoRA {name}",
                on_step=on_step,
                should_stop=should_stop,
            )
        if not finished:
            raise TrainingInterrupted(state["step"], settings.steps)

        _save(trainable, output, settings.steps)
        record.finished, record.file_hash = True, _file_hash(output)
        # Done: keep only what recognises this run (the factors are in the file; the optimizer state goes).
        save_state(state_path, {"run": record.state_dict(), "history": history.state_dict()})
    lora = load_lora(output, name=name)  # what every reader of the file gets
    return TrainResult(
        lora,
        output,
        settings.steps,
        history.losses,
        history.lrs,
        resumed_from=resumed_from,
        notes=notes,
        validation_images=validation_images,
    )


def _validation_sample(base: SDBase, settings: TrainSettings, output: Path, step: int) -> Path:
    """A fixed-seed sample (the Sampler's defaults, at the training resolution) saved next to the output."""
    from ..files import atomic_write
    from ..sd15.images import to_pil
    from ..sd15.sampling import sample

    size = settings.resolution
    picture = to_pil(sample(base, settings.validation_prompt, seed=settings.seed, width=size, height=size).images[0])
    path = output.with_name(f"{output.stem}-validation-step{step:08d}.png")
    return atomic_write(path, lambda temporary: picture.save(temporary, format="PNG"))


@contextlib.contextmanager
def _sampling_modes(base: SDBase) -> Iterator[None]:
    """Eval mode and no autograd for a validation sample in the middle of training."""
    modules = (base.model.components.unet, base.model.components.text_encoder)
    modes = [module.training for module in modules]
    try:
        for module in modules:
            module.eval()
        with torch.no_grad():
            yield
    finally:
        for module, training in zip(modules, modes, strict=True):
            module.train(training)


def _tokenizer(base: SDBase):
    from ..sd15.tokenizer import load_clip_tokenizer

    return load_clip_tokenizer(base.model.tokenizer_source)
