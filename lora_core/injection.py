"""A LoRA being trained, in a model's forward pass, without touching any weight.

Training adds `scale · up(down(x))` to each target module's output through a forward hook, as PEFT's LoRA
layer does (`base(x) + lora_B(lora_A(x)) · scaling`, factors in float32, the result cast to the module's
dtype). The module keeps its own weight — W0, or W0 plus whatever the base handle has applied or fused — so
removing the hooks leaves the model bitwise as it was, and the patch engine's bookkeeping is never involved.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .lora import target_module
from .trainable import TrainableAdapter, TrainableLoRA


def lora_output(module: nn.Module, adapter: TrainableAdapter, x: torch.Tensor) -> torch.Tensor:
    """`scale · up(down(x))` for `module`'s input `x`, in the factors' dtype."""
    x = x.to(adapter.down.dtype)
    if isinstance(module, nn.Conv2d):
        # `down` is a convolution with the module's own geometry, `up` a 1×1 (kohya's LoRA on a conv).
        hidden = F.conv2d(x, adapter.down, None, module.stride, module.padding, module.dilation, module.groups)
        return F.conv2d(hidden, adapter.up) * adapter.scale
    if isinstance(module, nn.Linear):
        return F.linear(F.linear(x, adapter.down), adapter.up) * adapter.scale
    raise TypeError(f"a LoRA can be trained on Linear and Conv2d modules, not {type(module).__name__}")


def _hook(adapter: TrainableAdapter):
    def add_lora(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + lora_output(module, adapter, args[0]).to(output.dtype)

    return add_lora


@contextlib.contextmanager
def lora_in_forward(components: Mapping[str, nn.Module], lora: TrainableLoRA) -> Iterator[None]:
    """While active, every target module of `components` ({"unet": …, "text_encoder": …}) computes
    `W x + b + scale · up(down(x))` with `lora`'s live parameters; the hooks are removed on exit."""
    handles = []
    try:
        for target, adapter in lora.items():
            if adapter.mid is not None:
                raise TypeError(f"{target}: training a LoCon Tucker core is not supported")
            module = target_module(components, target)
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                raise TypeError(f"{target}: a {type(module).__name__} cannot take a LoRA")
            handles.append(module.register_forward_hook(_hook(adapter)))
        yield
    finally:
        for handle in handles:
            handle.remove()
