"""lora_core: the shared LoRA engine of LoRA Loom.

Formats in, one canonical form, and an in-place patch engine with reversible deltas; SD1.5's topology comes
from `sd15.keys`. Nothing here imports ComfyUI.
"""
