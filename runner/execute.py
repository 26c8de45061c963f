"""Executing a validated prompt: only what the output nodes need, dependencies first, with an output cache.

Like ComfyUI's `PromptExecutor` (`execution.py`) with its classic cache (`comfy_execution/caching.py`,
`CacheKeySetInputSignature`): a node's cache key is its class, its `IS_CHANGED` result, its constant inputs
and, for each linked input, the upstream node's key and output slot. So re-running a prompt with one changed
widget re-executes that node and its dependents only. Before each run the cache drops the entries the new
prompt does not use (ComfyUI's `clean_unused`), so one prompt's intermediate results are kept, not a history.
Nodes run under `torch.inference_mode()`, as in ComfyUI, except those whose schema `needs_grad` (training).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..nodes.schema import NodeSchema, grad_mode
from .errors import NodeExecutionError, ValidationFailed
from .validate import Validation, is_link, validate_prompt


@dataclass
class RunResult:
    ui: dict[str, dict[str, Any]] = field(default_factory=dict)  # output node id -> its "ui" dict
    outputs: dict[str, tuple] = field(default_factory=dict)  # node id -> output values
    executed: list[str] = field(default_factory=list)  # node ids run this time, in order
    cached: list[str] = field(default_factory=list)  # node ids served from the cache
    seconds: float = 0.0
    validation: Validation | None = None


@dataclass
class _Entry:
    outputs: tuple
    ui: dict[str, Any] | None


class Runner:
    """Runs API prompts with node `schemas` (validation) and V1-style `classes` (execution).

    Keep one Runner per process to reuse node outputs between runs.
    """

    def __init__(
        self,
        schemas: Mapping[str, NodeSchema],
        classes: Mapping[str, type],
        *,
        progress: bool = True,
        models_dir: str | Path | None = None,
    ):
        self.schemas = dict(schemas)
        self.classes = dict(classes)
        self.progress = progress
        self.models_dir = models_dir
        self._cache: dict[str, _Entry] = {}

    def validate(self, prompt: Mapping[str, Any], hints: Mapping | None = None) -> Validation:
        return validate_prompt(prompt, self.schemas, self.classes, hints=hints, models_dir=self.models_dir)

    def clear_cache(self) -> None:
        self._cache.clear()

    def run(
        self,
        prompt: Mapping[str, Any],
        *,
        extra_pnginfo: dict[str, Any] | None = None,
        hints: Mapping | None = None,
        validation: Validation | None = None,
    ) -> RunResult:
        """Validates (unless given a passing `validation` of this prompt) and executes `prompt`.

        Raises ValidationFailed (nothing ran) or NodeExecutionError (the nodes before it did run).
        """
        start = time.perf_counter()
        validation = validation if validation is not None else self.validate(prompt, hints)
        if validation.problems:
            raise ValidationFailed(validation.problems)
        work = validation.prompt
        original = json.loads(json.dumps(dict(prompt), default=str))  # what SaveImage embeds, as queued
        order = validation.order

        keys: dict[str, str] = {}
        for node_id in order:
            keys[node_id] = self._key(node_id, work[node_id], keys)
        wanted = set(keys.values())
        self._cache = {k: v for k, v in self._cache.items() if k in wanted}

        result = RunResult(validation=validation)
        bar = _progress(len(order), self.progress)
        try:
            for node_id in order:
                class_type = work[node_id]["class_type"]
                bar.set_postfix_str(f"{node_id} {class_type}", refresh=False)
                entry = self._cache.get(keys[node_id])
                if entry is None:
                    with grad_mode(self.schemas[class_type]):
                        entry = self._execute(node_id, work[node_id], result.outputs, original, extra_pnginfo)
                    self._cache[keys[node_id]] = entry
                    result.executed.append(node_id)
                else:
                    result.cached.append(node_id)
                result.outputs[node_id] = entry.outputs
                if entry.ui is not None:
                    result.ui[node_id] = entry.ui
                bar.update(1)
        finally:
            bar.close()
        result.seconds = time.perf_counter() - start
        return result

    # ------------------------------------------------------------------------------------------ internals

    def _key(self, node_id: str, node: dict[str, Any], keys: dict[str, str]) -> str:
        class_type = node["class_type"]
        cls = self.classes[class_type]
        inputs = node["inputs"]
        signature: list[Any] = [class_type, self._is_changed(cls, inputs)]
        if getattr(cls, "NOT_IDEMPOTENT", False) or "UNIQUE_ID" in _hidden(cls).values():
            signature.append(node_id)
        for name in sorted(inputs):
            value = inputs[name]
            if is_link(value):
                signature.append([name, "LINK", keys[str(value[0])], value[1]])
            else:
                signature.append([name, value])
        text = json.dumps(signature, sort_keys=True, default=repr)
        return hashlib.sha256(text.encode()).hexdigest()

    @staticmethod
    def _is_changed(cls: type, inputs: dict[str, Any]) -> Any:
        function = getattr(cls, "IS_CHANGED", None)
        if function is None:
            return False
        constants = {name: (None if is_link(value) else value) for name, value in inputs.items()}
        try:
            changed = function(**constants)
        except Exception as error:  # noqa: BLE001 - as ComfyUI: warn, and never reuse the output
            print(f"warning: {cls.__name__}.IS_CHANGED failed: {error}", file=sys.stderr)
            changed = math.nan
        if isinstance(changed, float) and math.isnan(changed):
            return uuid.uuid4().hex  # NaN never equals itself: always re-run
        return changed

    def _execute(
        self,
        node_id: str,
        node: dict[str, Any],
        outputs: dict[str, tuple],
        prompt: dict[str, Any],
        extra_pnginfo: dict[str, Any] | None,
    ) -> _Entry:
        class_type = node["class_type"]
        cls = self.classes[class_type]
        kwargs: dict[str, Any] = {}
        for name, value in node["inputs"].items():
            if is_link(value):
                kwargs[name] = outputs[str(value[0])][value[1]]
            elif name in {i.name for i in self.schemas[class_type].inputs}:
                kwargs[name] = value
        for name, kind in _hidden(cls).items():
            if kind == "PROMPT":
                kwargs[name] = prompt
            elif kind == "EXTRA_PNGINFO":
                kwargs[name] = extra_pnginfo
            elif kind == "UNIQUE_ID":
                kwargs[name] = node_id
        try:
            returned = getattr(cls(), cls.FUNCTION)(**kwargs)
            values, ui = _split(returned)
            expected = len(self.schemas[class_type].outputs)
            if len(values) < expected:
                raise TypeError(f"returned {len(values)} output value(s), the node has {expected} output(s)")
        except Exception as error:
            raise NodeExecutionError(node_id, class_type, error) from error
        return _Entry(values, ui)


def _split(returned: Any) -> tuple[tuple, dict[str, Any] | None]:
    """A node's return value as (outputs, ui): a tuple, or ComfyUI's {"ui": ..., "result": ...}."""
    if isinstance(returned, dict):
        result = returned.get("result", ())
        return tuple(result) if result is not None else (), returned.get("ui")
    if returned is None:
        return (), None
    if isinstance(returned, (tuple, list)):
        return tuple(returned), None
    raise TypeError(f"returned a {type(returned).__name__}; a node returns a tuple or a dict with 'ui'/'result'")


def _hidden(cls: type) -> dict[str, str]:
    try:
        hidden = cls.INPUT_TYPES().get("hidden", {})
    except Exception:  # noqa: BLE001 - a broken INPUT_TYPES surfaces when the node runs
        return {}
    return {name: kind for name, kind in hidden.items() if isinstance(kind, str)}


class _NoBar:
    def set_postfix_str(self, *args, **kwargs) -> None:
        pass

    def update(self, *args) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="nodes", unit="node", file=sys.stderr, dynamic_ncols=True)
