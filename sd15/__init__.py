"""sd15: the Stable Diffusion 1.5 runtime LoRA Loom stands on.

Checkpoint key maps (`keys`), model I/O and offline configs (`models`, `configs/`), the built-in bases
(`builtin/`), the CLIP tokenizer, sampling with diffusers' pipeline, and the SD_BASE handle (`base`), which
pairs a loaded model with the LoRA engine in `lora_core`. Nothing here imports ComfyUI.
"""
