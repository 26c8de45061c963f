"""Where the untouched base weights W0 come from when the engine needs them again.

A base loaded from a safetensors file can re-read W0 from that file (memory-mapped: the OS page
cache holds it, not the process), so restoring costs no copy of the patched weights.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from safetensors import safe_open


class FileWeightSource:
    """Reads base weights back from the safetensors file the model was loaded from.

    `key_map[component][param_name]` names the file tensor each model parameter was loaded from.
    The loader converted with `tensor.to(dtype)`; `read` applies exactly the same conversion, so
    the result is bitwise the weight the loader produced.
    """

    def __init__(self, path: str | os.PathLike, key_map: Mapping[str, Mapping[str, str]]) -> None:
        self.path = os.fspath(path)
        self.key_map = {component: dict(names) for component, names in key_map.items()}
        self._file = safe_open(self.path, framework="pt", device="cpu")

    def read(self, component: str, param_name: str, like: torch.Tensor) -> torch.Tensor | None:
        """W0 for one parameter, in `like`'s dtype, shape and device; None if the file lacks it."""
        file_key = self.key_map.get(component, {}).get(param_name)
        if file_key is None:
            return None
        tensor = self._file.get_tensor(file_key).to(like.dtype).reshape(like.shape)
        return tensor.to(like.device)
