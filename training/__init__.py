"""Training LoRAs on an SD1.5 base (TrainLoRA's engine; no ComfyUI import): dataset, encoded-input cache,
settings, the trainer, its kohya metadata and its loss chart."""
