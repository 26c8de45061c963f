"""HTTP routes the editor's LoRA Loom extensions call, as plain functions plus a thin host registration.

``GET /lora_loom/lora_info?name=<name as LoadLoRA lists it>`` answers the LoRA inspector: what the file is,
read from its safetensors header (:mod:`..lora_core.inspect`). A name is served only if LoadLoRA lists it
and its real path (symlinks followed) lies inside a loras folder; anything else is refused before a byte
of any file is read. ``GET /lora_loom/train_history`` gives the training messages of the runs so far (the
loss chart catches up with it after a page reload).
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from urllib.parse import unquote

from ..lora_core.inspect import InspectError, inspect_lora
from .paths import lora_choices, model_path, model_roots

LORA_INFO_ROUTE = "/lora_loom/lora_info"
TRAIN_HISTORY_ROUTE = "/lora_loom/train_history"
MAX_NAME_LENGTH = 1024
MAX_KEPT_MESSAGES = 5000  # per node; the chart thins its own copy

# The `lora_loom.train` messages of each TrainLoRA node's latest run, so that an editor reloaded mid-run
# can redraw the curve so far. Written from the host's execution thread, read from its event loop.
_train_runs: dict[str, list[dict]] = {}
_train_runs_lock = threading.Lock()


def record_train_message(message: dict) -> None:
    node = str(message.get("node"))
    with _train_runs_lock:
        run = _train_runs.setdefault(node, [])
        if run and (message["step"] <= run[-1]["step"] or message.get("prompt_id") != run[-1].get("prompt_id")):
            run.clear()  # a new run of that node
        run.append(dict(message))
        del run[:-MAX_KEPT_MESSAGES]


def train_history() -> dict[str, list[dict]]:
    with _train_runs_lock:
        return {node: list(run) for node, run in _train_runs.items()}


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _spellings(name: str) -> list[str]:
    # The name as given and as decoded once and twice more: a client (or a proxy) may have encoded it.
    found = [name]
    for _ in range(2):
        found.append(unquote(found[-1]))
    return found


def _is_traversal(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    drive = len(name) > 1 and name[1] == ":"
    return "\0" in name or name.startswith(("/", "\\")) or drive or ".." in parts


def lora_file(name: object) -> Path:
    """The file a LoRA name (as LoadLoRA lists it) stands for; raises Refused with an HTTP status."""
    if not isinstance(name, str) or not name:
        raise Refused(400, "missing 'name': a LoRA name as LoadLoRA lists it")
    if len(name) > MAX_NAME_LENGTH:
        raise Refused(400, "name too long")
    if any(_is_traversal(spelling) for spelling in _spellings(name)):
        raise Refused(403, "name leaves the loras folders")
    if name not in lora_choices():
        raise Refused(404, f"no LoRA named {name!r} in the loras folders")
    path = model_path("loras", name)
    if path is None:
        raise Refused(404, f"no LoRA named {name!r} in the loras folders")
    real = Path(os.path.realpath(path))
    roots = [Path(os.path.realpath(root)) for root in model_roots("loras")]
    if not any(real.is_relative_to(root) for root in roots):
        raise Refused(403, f"{name!r} is a link that leads out of the loras folders")
    return real


def lora_info(name: object) -> tuple[int, dict]:
    """(HTTP status, JSON body) for the inspector."""
    try:
        path = lora_file(name)
    except Refused as refused:
        return refused.status, {"error": str(refused)}
    if path.is_dir() or path.suffix != ".safetensors":
        return 415, {"error": f"{name}: only .safetensors files can be inspected from their header"}
    try:
        return 200, {"name": name, **inspect_lora(path)}
    except InspectError as error:
        return 422, {"error": str(error)}
    except OSError as error:
        return 500, {"error": f"{name}: {error.strerror or error}"}


def register_host_routes() -> bool:
    """Register on the running host's PromptServer; False outside a running ComfyUI server.

    The host's main.py has imported its `server` module and made the PromptServer before it loads custom
    nodes, so we only look it up: importing it ourselves would start loading the host's model code.
    """
    server = sys.modules.get("server")
    prompt_server = getattr(getattr(server, "PromptServer", None), "instance", None)
    if prompt_server is None:
        return False
    register_routes(prompt_server.routes)
    return True


def register_routes(routes) -> None:
    """Add the routes to an aiohttp RouteTableDef (the host's ``PromptServer.instance.routes``)."""
    from aiohttp import web

    @routes.get(LORA_INFO_ROUTE)
    async def get_lora_info(request: web.Request) -> web.Response:
        status, body = lora_info(request.query.get("name"))
        return web.json_response(body, status=status)

    @routes.get(TRAIN_HISTORY_ROUTE)
    async def get_train_history(request: web.Request) -> web.Response:
        return web.json_response(train_history())
