"""Adapter kinds, one file each, behind one small base class."""

from .base import AdapterError, WeightAdapter
from .lora import LoRAAdapter

__all__ = ["AdapterError", "WeightAdapter", "LoRAAdapter"]
