"""What a LoRA file is, from its safetensors header alone: for an inspector that must answer before anything runs.

A safetensors file starts with an 8-byte little-endian header length and a JSON header (tensor names, dtypes,
shapes, offsets, and the ``__metadata__`` strings). Everything here comes from that header, the few bytes of
the scalar ``alpha`` tensors, and the 64 KiB A1111's legacy hash reads; the weights themselves are never read,
so a multi-gigabyte file answers as fast as a small one. The module and format rules are the loader's
(:mod:`.formats`), so the inspector reports what LoadLoRA will understand.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np

from .formats import _MetadataAlphas, _split_suffix, not_understood_group
from .lora import COMPONENTS, component_of
from .targets import alias_table
from .writer import LEGACY_HASH_LENGTH, LEGACY_HASH_OFFSET, legacy_hash_of_span

# safetensors refuses headers over 100 MB (its MAX_HEADER_SIZE); so do we, before allocating anything.
MAX_HEADER_BYTES = 100_000_000
_SCALAR_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4"}
TOP_TAGS = 20


class InspectError(ValueError):
    """The file is not a readable safetensors file (the message says why)."""


def read_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str], int]:
    """(tensors {name: {dtype, shape, data_offsets}}, metadata, byte offset of the data) of a safetensors file."""
    path = Path(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise InspectError(f"{path.name}: {'empty' if not prefix else 'truncated'} file (no safetensors header)")
        length = int.from_bytes(prefix, "little")
        if length == 0 or length > MAX_HEADER_BYTES:
            raise InspectError(f"{path.name}: header length {length} is not a safetensors header")
        raw = f.read(length)
    if len(raw) < length:
        raise InspectError(f"{path.name}: header cut short ({len(raw)} of {length} bytes)")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InspectError(f"{path.name}: header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise InspectError(f"{path.name}: header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InspectError(f"{path.name}: __metadata__ is not a map of strings")
    for name, entry in header.items():
        ok = isinstance(entry, dict) and isinstance(entry.get("shape"), list)
        ok = ok and isinstance(entry.get("dtype"), str) and isinstance(entry.get("data_offsets"), list)
        if not ok or len(entry["data_offsets"]) != 2:
            raise InspectError(f"{path.name}: header entry {name!r} is not a tensor description")
    return header, metadata, 8 + length


def _read_scalar(f, data_start: int, entry: dict) -> float | None:
    dtype = entry["dtype"]
    begin, end = entry["data_offsets"]
    if end - begin > 8 or dtype not in (*_SCALAR_DTYPES, "BF16"):
        return None
    f.seek(data_start + begin)
    raw = f.read(end - begin)
    if dtype == "BF16":  # the upper half of a float32
        return float(np.frombuffer(b"\0\0" + raw[:2], "<f4")[0])
    values = np.frombuffer(raw, _SCALAR_DTYPES[dtype])
    return float(values[0]) if values.size == 1 else None


def file_legacy_hash(path: str | os.PathLike) -> str:
    """:func:`.writer.legacy_hash` of a file on disk, reading only the 64 KiB it hashes."""
    with open(path, "rb") as f:
        f.seek(LEGACY_HASH_OFFSET)
        return legacy_hash_of_span(f.read(LEGACY_HASH_LENGTH))


def top_tags(metadata: dict[str, str], limit: int = TOP_TAGS) -> list[tuple[str, int]]:
    """The most frequent caption tags from kohya's ``ss_tag_frequency`` ({dataset: {tag: count}})."""
    try:
        frequency = json.loads(metadata.get("ss_tag_frequency") or "{}")
    except json.JSONDecodeError:
        return []
    counts: Counter[str] = Counter()
    for tags in frequency.values() if isinstance(frequency, dict) else ():
        if isinstance(tags, dict):
            for tag, count in tags.items():
                if isinstance(count, int | float):
                    counts[tag.strip()] += int(count)
    return counts.most_common(limit)


_TRAINING_KEYS = {
    "base_model": ("ss_base_model_version", "modelspec.architecture"),
    "steps": ("ss_steps", "ss_max_train_steps"),
    "epochs": ("ss_epoch",),
    "resolution": ("ss_resolution", "modelspec.resolution"),
    "optimizer": ("ss_optimizer",),
    "learning_rate": ("ss_learning_rate",),
    "train_images": ("ss_num_train_images",),
    "network_module": ("ss_network_module",),
    "training_comment": ("ss_training_comment",),
    "title": ("modelspec.title",),
}


def inspect_lora(path: str | os.PathLike) -> dict:
    """A JSON-ready description of a LoRA file, read from its header (see module docstring)."""
    path = Path(path)
    tensors, metadata, data_start = read_header(path)
    table = alias_table()
    modules: dict[str, dict] = {}
    not_understood: Counter[str] = Counter()
    formats: set[str] = set()
    with open(path, "rb") as f:
        for key, entry in tensors.items():
            split = _split_suffix(key)
            target = table.get(split[0]) if split else None
            if target is None:
                not_understood[not_understood_group(split[0] if split else key)] += 1
                continue
            alias, role, family = split
            module = modules.setdefault(target, {"alias": alias})
            if family:
                formats.add(family)
            if role == "down":
                module["rank"] = int(entry["shape"][0]) if entry["shape"] else None
            elif role == "alpha":
                module["alpha"] = _read_scalar(f, data_start, entry)
            elif role == "dora":
                module["dora"] = True
    alphas = _MetadataAlphas(metadata)
    for target, module in modules.items():
        if module.get("alpha") is None:
            module["alpha"] = alphas.alpha(target, module["alias"])
        if module.get("alpha") is None:
            module["alpha"] = module.get("rank")  # no alpha anywhere: alpha = rank, as the loader reads it
    per_component = {
        component: sorted(target for target in modules if component_of(target) == component) for component in COMPONENTS
    }

    def distinct(field: str, component: str) -> list:
        return sorted({modules[t].get(field) for t in per_component[component]} - {None})

    training = {}
    for field, keys in _TRAINING_KEYS.items():
        value = next((metadata[k] for k in keys if metadata.get(k) not in (None, "", "None")), None)
        if value is not None:
            training[field] = value
    return {
        "file": path.name,
        "bytes": path.stat().st_size,
        "formats": sorted(formats),
        "modules": {component: len(targets) for component, targets in per_component.items()},
        "ranks": {component: distinct("rank", component) for component in COMPONENTS},
        "alphas": {component: distinct("alpha", component) for component in COMPONENTS},
        "dora_modules": sum(bool(m.get("dora")) for m in modules.values()),
        "not_understood": dict(not_understood.most_common()),
        "training": training,
        "trigger_words": [{"tag": tag, "count": count} for tag, count in top_tags(metadata)],
        "hashes": {
            "sshs_model_hash": metadata.get("sshs_model_hash"),
            "sshs_legacy_hash": metadata.get("sshs_legacy_hash"),
            "legacy_hash": file_legacy_hash(path),
        },
        "metadata_keys": sorted(metadata),
    }
