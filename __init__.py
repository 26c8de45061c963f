"""LoRA Loom — a ComfyUI node pack (the repository root is the package).

ComfyUI imports this folder under an arbitrary module name; everything inside uses relative imports,
and no ComfyUI module is imported here (only inside node code, when running in the host).
"""

import os

# CPU training is bitwise reproducible across processes (same seed, data and base → same file; a resumed run =
# an uninterrupted one) only in MKL's conditional-numerical-reproducibility mode: otherwise MKL picks kernels by
# memory alignment and two processes round differently. "AUTO" keeps the machine's fastest kernels (measured:
# no slowdown on a 1024² matmul). It must be set before MKL's first call; a user's own setting wins.
os.environ.setdefault("MKL_CBWR", "AUTO")

from .nodes.registry import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402
from .nodes.v3 import comfy_entrypoint, serve_v3  # noqa: E402
from .nodes.web_routes import register_host_routes  # noqa: E402

WEB_DIRECTORY = "./web"
register_host_routes()  # only inside ComfyUI: its PromptServer serves the editor extensions' routes

if serve_v3():
    # The host reads `comfy_entrypoint` only from a pack without NODE_CLASS_MAPPINGS: same nodes, V3 classes.
    NODE_CLASS_MAPPINGS = NODE_DISPLAY_NAME_MAPPINGS = None

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY", "comfy_entrypoint"]
