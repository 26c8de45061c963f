"""lora_core: the shared LoRA engine of LoRA Loom.

Formats in, one canonical form, and an in-place patch engine with reversible deltas.
Nothing here imports ComfyUI.
"""
