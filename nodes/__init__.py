"""ComfyUI node classes (thin wrappers over lora_core)."""
