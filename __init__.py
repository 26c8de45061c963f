"""LoRA Loom — a ComfyUI node pack (the repository root is the package).

ComfyUI imports this folder under an arbitrary module name; everything inside uses relative imports,
and no ComfyUI module is imported here (only inside node code, when running in the host).
"""

from .nodes.registry import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
