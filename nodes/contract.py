"""LoRA Loom's public node contract: ids, input names and order, output order. Workflows depend on it."""

from __future__ import annotations

from ..sd15.sampling import SAMPLERS, SCHEDULES
from ..training.settings import LR_SCHEDULERS, MIXED_PRECISIONS, OPTIMIZERS, TARGETS
from .paths import checkpoint_choices, lora_choices
from .schema import Input, NodeSchema, Output

CATEGORY = "LoRA Loom"
DTYPES = ("auto", "fp32", "fp16", "bf16")
STRENGTH = {"type": "FLOAT", "default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}
SEED = {"type": "INT", "default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}

LOAD_BASE = NodeSchema(
    node_id="LoadBase",
    display_name="Load SD1.5 Base",
    category=CATEGORY,
    description="Loads a Stable Diffusion 1.5 checkpoint (single file or diffusers folder), fully offline.",
    inputs=(
        Input("ckpt_name", "COMBO", options=checkpoint_choices, tooltip="checkpoints folder, or a built-in base"),
        Input(
            "dtype",
            "COMBO",
            default="auto",
            options=DTYPES,
            tooltip="auto: the file's own precision on a GPU, fp32 on the CPU",
        ),
    ),
    outputs=(Output("SD_BASE", "base"),),
)

LOAD_LORA = NodeSchema(
    node_id="LoadLoRA",
    display_name="Load LoRA",
    category=CATEGORY,
    description="Reads a LoRA (kohya, diffusers, PEFT or ComfyUI layout) and reports what it matched.",
    inputs=(Input("lora_name", "COMBO", options=lora_choices, tooltip="loras folder"),),
    outputs=(Output("LORA", "lora"),),
)

APPLY_LORA = NodeSchema(
    node_id="ApplyLoRA",
    display_name="Apply LoRA",
    category=CATEGORY,
    description="Adds a LoRA to the base's patch set, with separate U-Net and text-encoder strengths. Chainable.",
    inputs=(
        Input("base", "SD_BASE", tooltip="the base (and the LoRAs already applied to it)"),
        Input("lora", "LORA", tooltip="from Load LoRA or Train LoRA"),
        Input("strength_unet", **STRENGTH, tooltip="multiplier of the LoRA's U-Net change (0: off, 1: as trained)"),
        Input(
            "strength_text_encoder",
            **STRENGTH,
            tooltip="multiplier of the LoRA's text-encoder change (0: off, 1: as trained)",
        ),
    ),
    outputs=(Output("SD_BASE", "base"),),
)

APPLY_LORA_TO_MODEL = NodeSchema(
    node_id="ApplyLoRAToModel",
    display_name="Apply LoRA to MODEL/CLIP",
    category=CATEGORY,
    description="Adds a LoRA (any file Load LoRA reads, or Train LoRA's) to ComfyUI's own MODEL and CLIP, for "
    "KSampler and every other node that takes them. The patched weights are LoRA Loom's, bit for bit.",
    inputs=(
        Input("model", "MODEL", tooltip="ComfyUI's SD1.5 diffusion model (e.g. from Load Checkpoint)"),
        Input("clip", "CLIP", tooltip="ComfyUI's SD1.5 text encoder"),
        Input("lora", "LORA", tooltip="from Load LoRA or Train LoRA"),
        Input("strength_model", **STRENGTH, tooltip="multiplier of the LoRA's U-Net change (0: off, 1: as trained)"),
        Input(
            "strength_clip", **STRENGTH, tooltip="multiplier of the LoRA's text-encoder change (0: off, 1: as trained)"
        ),
    ),
    outputs=(Output("MODEL", "model"), Output("CLIP", "clip")),
)

LOOM_TO_COMFY = NodeSchema(
    node_id="LoomToComfy",
    display_name="LoRA Loom base to MODEL/CLIP/VAE",
    category=CATEGORY,
    description="The base as it is here (fused and applied LoRAs in) as ComfyUI's own MODEL, CLIP and VAE, for "
    "KSampler and every other node that takes them.",
    inputs=(Input("base", "SD_BASE", tooltip="the base with its LoRAs applied"),),
    outputs=(Output("MODEL", "model"), Output("CLIP", "clip"), Output("VAE", "vae")),
)

COMFY_TO_LOOM = NodeSchema(
    node_id="ComfyToLoom",
    display_name="MODEL/CLIP/VAE to LoRA Loom base",
    category=CATEGORY,
    description="ComfyUI's MODEL, CLIP and VAE of an SD1.5 checkpoint (with the LoRAs loaded onto them) as a LoRA "
    "Loom base, for Train LoRA, Apply LoRA, Fuse LoRA and the Sampler. The base has its own copy of the weights.",
    inputs=(
        Input("model", "MODEL", tooltip="ComfyUI's SD1.5 diffusion model"),
        Input("clip", "CLIP", tooltip="ComfyUI's SD1.5 text encoder"),
        Input("vae", "VAE", tooltip="ComfyUI's SD1.5 VAE"),
    ),
    outputs=(Output("SD_BASE", "base"),),
)

FUSE_LORA = NodeSchema(
    node_id="FuseLoRA",
    display_name="Fuse LoRA",
    category=CATEGORY,
    description="Makes the applied LoRAs part of the base downstream; optionally saves a single-file checkpoint.",
    inputs=(
        Input("base", "SD_BASE", tooltip="the base with the LoRAs to fuse applied"),
        Input(
            "save_name",
            "STRING",
            default="",
            tooltip="empty: don't save; else a file in the checkpoints folder",
        ),
        Input("save_fp16", "BOOLEAN", default=False, optional=True, tooltip="write the checkpoint in float16"),
    ),
    outputs=(Output("SD_BASE", "base"),),
    output_node=True,
)

SAMPLER = NodeSchema(
    node_id="Sampler",
    display_name="Sampler (SD1.5)",
    category=CATEGORY,
    description="Text to image with the base's current LoRAs; diffusers schedulers.",
    inputs=(
        Input("base", "SD_BASE", tooltip="the base with its LoRAs applied"),
        Input("prompt", "STRING", default="", multiline=True, tooltip="what to draw (77 CLIP tokens are read)"),
        Input("negative_prompt", "STRING", default="", multiline=True, tooltip="what to steer away from"),
        Input("seed", **SEED, tooltip="starting noise; the same seed and settings give the same image"),
        Input("steps", "INT", default=20, min=1, max=10000, tooltip="denoising steps"),
        Input("cfg", "FLOAT", default=7.0, min=0.0, max=100.0, step=0.1, tooltip="classifier-free guidance scale"),
        Input("sampler_name", "COMBO", default="euler", options=SAMPLERS, tooltip="ComfyUI's sampler names"),
        Input("scheduler", "COMBO", default="normal", options=SCHEDULES, tooltip="timestep spacing"),
        Input("width", "INT", default=512, min=64, max=8192, step=8, tooltip="pixels, a multiple of 8"),
        Input("height", "INT", default=512, min=64, max=8192, step=8, tooltip="pixels, a multiple of 8"),
        Input("batch_size", "INT", default=1, min=1, max=64, tooltip="images per run (seed, seed+1, …)"),
    ),
    outputs=(Output("IMAGE", "image"), Output("LATENT", "latent")),
)

RATE = {"type": "FLOAT", "min": 0.0, "max": 1.0, "step": 0.000001}  # the editor rounds a FLOAT to its step

TRAIN_LORA = NodeSchema(
    node_id="TrainLoRA",
    display_name="Train LoRA (SD1.5)",
    category=CATEGORY,
    description="Trains a LoRA on a folder of captioned images, on top of the base's current LoRAs; writes a "
    "kohya-format file to the loras folder. Interruptible; the same inputs again resume (or return the file).",
    inputs=(
        Input("base", "SD_BASE", tooltip="the base to train on (its applied LoRAs stay in, frozen)"),
        Input(
            "dataset_dir",
            "STRING",
            default="toy-star (built-in)",
            tooltip="folder of images with same-name .txt captions (kohya N_name repeat folders too): absolute, "
            "relative to the input folder, or a built-in set",
        ),
        Input("caption_prefix", "STRING", default="", tooltip="trigger word, put in front of every caption"),
        Input("rank", "INT", default=16, min=1, max=256, tooltip="LoRA rank: size and capacity"),
        Input("alpha", "FLOAT", default=16.0, min=0.0, max=1024.0, step=0.5, tooltip="scale = alpha / rank"),
        Input("steps", "INT", default=500, min=1, max=1_000_000, tooltip="optimizer steps"),
        Input("learning_rate", **RATE, default=1e-4, tooltip="U-Net learning rate"),
        Input("text_encoder_lr", **RATE, default=5e-5, tooltip="text-encoder learning rate (if trained)"),
        Input("batch_size", "INT", default=1, min=1, max=64, tooltip="images per step"),
        Input("resolution", "INT", default=512, min=64, max=2048, step=64, tooltip="buckets around this size"),
        Input("seed", **SEED, tooltip="data order, noise and initial factors"),
        Input("train_text_encoder", "BOOLEAN", default=False, tooltip="also train LoRA factors in the text encoder"),
        Input(
            "target",
            "COMBO",
            default="attention",
            options=TARGETS,
            tooltip="attention: to_q/k/v/out; kohya: every kohya SD1.5 module (proj_in/out, ff, mlp too)",
        ),
        Input("optimizer", "COMBO", default="AdamW", options=OPTIMIZERS, tooltip="AdamW8bit needs bitsandbytes"),
        Input("lr_scheduler", "COMBO", default="constant", options=LR_SCHEDULERS, tooltip="learning-rate schedule"),
        Input("warmup_steps", "INT", default=0, min=0, max=1_000_000, tooltip="linear warm-up steps"),
        Input("min_snr_gamma", "FLOAT", default=5.0, min=0.0, max=100.0, step=0.1, tooltip="0: off"),
        Input(
            "noise_offset",
            "FLOAT",
            default=0.0,
            min=0.0,
            max=1.0,
            step=0.01,
            tooltip="0: off; lets the LoRA learn much darker or lighter images",
        ),
        Input("gradient_checkpointing", "BOOLEAN", default=False, tooltip="less memory, slower steps"),
        Input("mixed_precision", "COMBO", default="fp32", options=MIXED_PRECISIONS, tooltip="fp16 uses a grad scaler"),
        Input("save_every_n_steps", "INT", default=0, min=0, max=1_000_000, tooltip="0: only the final file"),
        Input("output_name", "STRING", default="my-lora", tooltip="file name in the loras folder (no folders)"),
        Input("use_rslora", "BOOLEAN", default=False, optional=True, tooltip="scale alpha/sqrt(rank)"),
        Input(
            "validation_prompt",
            "STRING",
            default="",
            multiline=True,
            optional=True,
            tooltip="a fixed-seed sample with this prompt every validation_every_n_steps",
        ),
        Input("validation_every_n_steps", "INT", default=0, min=0, max=1_000_000, optional=True, tooltip="0: off"),
    ),
    outputs=(Output("LORA", "lora"), Output("STRING", "lora_name"), Output("IMAGE", "loss_curve")),
    output_node=True,
    needs_grad=True,
    hidden=(("unique_id", "UNIQUE_ID"),),
)

GRID_LAYOUTS = ("batch per row", "batch per column")

IMAGE_GRID = NodeSchema(
    node_id="LoomImageGrid",
    display_name="Image Grid (LoRA Loom)",
    category=CATEGORY,
    description="One picture from up to 6 IMAGE batches, a batch per row (e.g. a prompt per row, its images in "
    "order) or, with layout 'batch per column', a batch per column (e.g. a LoRA strength per column, seeds down).",
    inputs=(
        Input("row_1", "IMAGE", tooltip="the first row's (or column's) images"),
        Input(
            "row_labels",
            "STRING",
            default="",
            multiline=True,
            tooltip="one label per line, drawn left of its row (above its column)",
        ),
        Input("upscale", "INT", default=2, min=1, max=16, tooltip="nearest-neighbour enlargement"),
        *(Input(f"row_{i}", "IMAGE", optional=True, tooltip=f"row (column) {i}'s images") for i in range(2, 7)),
        Input(
            "layout",
            "COMBO",
            default=GRID_LAYOUTS[0],
            options=GRID_LAYOUTS,
            optional=True,
            tooltip="a batch per row, its images left to right; or a batch per column, its images top to bottom",
        ),
    ),
    outputs=(Output("IMAGE", "image"),),
)

NODES: tuple[NodeSchema, ...] = (
    LOAD_BASE,
    LOAD_LORA,
    APPLY_LORA,
    FUSE_LORA,
    TRAIN_LORA,
    SAMPLER,
    IMAGE_GRID,
    APPLY_LORA_TO_MODEL,
    LOOM_TO_COMFY,
    COMFY_TO_LOOM,
)

# ComfyUI core nodes the headless runner provides with the host's semantics (never registered in the host).
SAVE_IMAGE = NodeSchema(
    node_id="SaveImage",
    display_name="Save Image",
    category="image",
    description="Saves images as PNG with the prompt and workflow embedded.",
    inputs=(Input("images", "IMAGE"), Input("filename_prefix", "STRING", default="ComfyUI")),
    output_node=True,
)
PREVIEW_IMAGE = NodeSchema(
    node_id="PreviewImage",
    display_name="Preview Image",
    category="image",
    description="Shows images (headless: writes them to the temp folder).",
    inputs=(Input("images", "IMAGE"),),
    output_node=True,
)
CORE_NODES: tuple[NodeSchema, ...] = (SAVE_IMAGE, PREVIEW_IMAGE)
