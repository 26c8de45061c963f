"""Training states on disk without pickle: tensors in a safetensors file, everything else as JSON inside it.

A resume state (module and optimizer `state_dict()`s, schedule state, RNG states, counters) is a tree of
dicts, lists, tuples, numbers, strings and tensors. `save_state` stores each tensor under its own key and the
tree's shape as JSON in the file's metadata; `load_state` rebuilds the same tree. Loading runs no code from
the file (unlike `torch.load`), so a state found in a shared folder is safe to open. Tensors come back
bitwise and in their memory layout (channels-last stays channels-last), floats exactly (JSON writes their
shortest exact repr): a resumed run stays bitwise an uninterrupted one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..files import atomic_write

_TREE_KEY = "lora_loom.state"
_TENSOR, _ORDER, _TUPLE, _ITEMS = "__tensor__", "order", "__tuple__", "__items__"


class StateFileError(ValueError):
    """A state file is missing, damaged, or not one `save_state` wrote (the message names the file)."""


def save_state(path: str | os.PathLike, tree: Mapping[str, Any]) -> Path:
    """Write `tree` to `path` (atomically)."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            key = f"t{len(tensors)}"
            tensor, order = _dense_order(value.detach().to("cpu", copy=True))
            tensors[key] = tensor
            return {_TENSOR: key, _ORDER: order} if order else {_TENSOR: key}
        if isinstance(value, tuple):
            return {_TUPLE: [encode(v) for v in value]}
        if isinstance(value, list):
            return [encode(v) for v in value]
        if isinstance(value, Mapping):
            if all(isinstance(k, str) and not k.startswith("__") for k in value):
                return {k: encode(v) for k, v in value.items()}
            return {_ITEMS: [[encode(k), encode(v)] for k, v in value.items()]}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"save_state: cannot store a {type(value).__name__}")

    shape = json.dumps(encode(dict(tree)), allow_nan=True)
    payload = save(tensors, metadata={_TREE_KEY: shape})
    return atomic_write(path, lambda temporary: temporary.write_bytes(payload))


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """The tree `save_state` wrote, tensors on the CPU."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        shape = json.loads(metadata[_TREE_KEY])
    except KeyError:
        raise StateFileError(f"{path}: not a LoRA Loom state file (no {_TREE_KEY!r} metadata)") from None
    except Exception as error:
        raise StateFileError(f"{path}: not a readable state file ({type(error).__name__}: {error})") from None

    def decode(value: Any) -> Any:
        if isinstance(value, list):
            return [decode(v) for v in value]
        if isinstance(value, dict):
            if _TENSOR in value:
                tensor = tensors[value[_TENSOR]]
                order = value.get(_ORDER)
                return tensor.permute([order.index(d) for d in range(len(order))]) if order else tensor
            if _TUPLE in value:
                return tuple(decode(v) for v in value[_TUPLE])
            if _ITEMS in value:
                return {_hashable(decode(k)): decode(v) for k, v in value[_ITEMS]}
            return {k: decode(v) for k, v in value.items()}
        return value

    return decode(shape)


def _dense_order(tensor: torch.Tensor) -> tuple[torch.Tensor, list[int] | None]:
    """(the tensor's data in memory order, the dimension order that lays it out) for a permuted dense tensor,
    e.g. channels-last; (contiguous copy, None) otherwise. Keeping the layout matters: kernels given a
    channels-last input round differently, so a resumed run would not be bitwise an uninterrupted one."""
    if tensor.is_contiguous() or tensor.ndim < 2:
        return tensor.contiguous(), None
    order = sorted(range(tensor.ndim), key=lambda d: (-tensor.stride(d), d))
    permuted = tensor.permute(order)
    return (permuted, order) if permuted.is_contiguous() else (tensor.contiguous(), None)


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key
