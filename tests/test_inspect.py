"""The header-only LoRA inspector reports what the loader understands, without reading the weights."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file
from test_formats import rename

from lora_loom.lora_core import inspect as inspect_module
from lora_loom.lora_core.formats import load_lora
from lora_loom.lora_core.inspect import InspectError, inspect_lora
from lora_loom.lora_core.synthetic import random_kohya_lora
from lora_loom.lora_core.targets import kohya_targets
from lora_loom.lora_core.writer import legacy_hash, save_lora

from util import make_lora


@pytest.fixture(scope="module")
def kohya_state(tiny_fp32):
    parts = {"unet": tiny_fp32.unet, "text_encoder": tiny_fp32.text_encoder}
    return random_kohya_lora(parts, kohya_targets("all"), rank=4, alpha=2.0, seed=3)


def lora_file_metadata(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def assert_matches_the_loader(info: dict, path) -> None:
    """Module counts, ranks and alphas per component equal what load_lora reads from the whole file."""
    lora = load_lora(path)
    assert info["modules"] == lora.components()
    for component in info["modules"]:
        adapters = [a for target, a in lora.adapters.items() if target.startswith(component + ".")]
        assert info["ranks"][component] == sorted({a.rank for a in adapters}), component
        assert info["alphas"][component] == sorted({a.alpha for a in adapters}), component
    assert info["formats"] == lora.report.formats


def test_a_trained_kohya_file_reports_rank_alpha_training_and_trigger_words(tiny_fp32, tmp_path):
    lora = make_lora(tiny_fp32, seed=2, rank=8, alpha=4.0)
    tags = {"10_toy star": {"star": 12, "red star": 3, "blue background": 5}, "reg": {"star": 2, "circle": 1}}
    metadata = {
        "ss_tag_frequency": json.dumps(tags),
        "ss_steps": 300,
        "ss_resolution": "(64, 64)",
        "ss_optimizer": "torch.optim.adamw.AdamW",
        "ss_base_model_version": "sd_v1",
    }
    path = save_lora(lora, tmp_path / "toy.safetensors", metadata=metadata)
    info = inspect_lora(path)
    assert_matches_the_loader(info, path)
    assert info["ranks"]["unet"] == [8] and info["alphas"]["unet"] == [4.0]
    assert info["training"]["steps"] == "300" and info["training"]["resolution"] == "(64, 64)"
    assert info["training"]["optimizer"].endswith("AdamW") and info["training"]["base_model"] == "sd_v1"
    assert info["trigger_words"][:2] == [{"tag": "star", "count": 14}, {"tag": "blue background", "count": 5}]
    assert info["hashes"]["sshs_model_hash"] == lora_file_metadata(path)["sshs_model_hash"]
    assert info["hashes"]["legacy_hash"] == legacy_hash(path.read_bytes())  # the writer's rule, 64 KiB read
    assert info["not_understood"] == {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_spelling_reports_what_the_loader_reads(kohya_state, tmp_path, dtype):
    spellings = {
        "kohya": kohya_state,
        "no alpha (alpha = rank)": {k: v for k, v in kohya_state.items() if not k.endswith(".alpha")},
        "diffusers lora.up": rename(kohya_state, lambda m: m, "lora.up.weight", "lora.down.weight"),
    }
    for label, state in spellings.items():
        path = tmp_path / f"{label.split()[0]}-{str(dtype)[6:]}.safetensors"
        save_file({k: v.to(dtype) for k, v in state.items()}, str(path))
        assert_matches_the_loader(inspect_lora(path), path)


def test_alphas_from_diffusers_metadata(kohya_state, tmp_path):
    lora = load_lora(_peft_file(kohya_state, tmp_path))
    info = inspect_lora(tmp_path / "pytorch_lora_weights.safetensors")
    assert info["alphas"]["unet"] == [1.0, 8.0] and info["alphas"]["text_encoder"] == [2.0]
    assert info["modules"] == lora.components() and info["formats"] == ["peft"]


def _peft_file(kohya_state, folder):
    from lora_loom.lora_core.formats import parse_lora
    from lora_loom.lora_core.targets import kohya_name

    by_kohya = {kohya_name(t): t for t in parse_lora(kohya_state).adapters}
    state = {}
    for key, tensor in kohya_state.items():
        module, suffix = key.split(".", 1)
        suffix = {"lora_up.weight": "lora_B.weight", "lora_down.weight": "lora_A.weight"}.get(suffix)
        if suffix:
            state[f"{by_kohya[module]}.{suffix}"] = tensor
    packed = {"unet.lora_alpha": 8, "unet.r": 4, "text_encoder.lora_alpha": 2, "unet.alpha_pattern": {"proj_in": 1}}
    save_file(
        state, str(folder / "pytorch_lora_weights.safetensors"), metadata={"lora_adapter_metadata": json.dumps(packed)}
    )
    return folder


def test_keys_the_loader_does_not_understand_are_grouped(kohya_state, tmp_path):
    state = dict(kohya_state)
    state.update(
        {f"lora_te2_text_model_encoder_layers_{i}_mlp_fc1.lora_down.weight": torch.zeros(4, 8) for i in range(3)}
    )
    state["something_else"] = torch.zeros(2)
    path = tmp_path / "mixed.safetensors"
    save_file(state, str(path))
    info = inspect_lora(path)
    assert info["not_understood"] == {"lora_te2_text_model_encoder_layers_*…": 3, "something_else": 1}
    assert load_lora(path).report.not_understood_count == 4


def test_a_sparse_multi_gigabyte_file_is_answered_from_its_header(kohya_state, tmp_path, monkeypatch):
    """Only the header, the alpha scalars and A1111's 64 KiB are read: counted, whatever the file's size."""
    path = tmp_path / "huge.safetensors"
    save_file(kohya_state, str(path))
    expected = inspect_lora(path)["modules"]
    with open(path, "rb") as f:
        length = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(length))
    end = max(entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__")
    huge = 3 * 1024**3
    header["padding.weight"] = {"dtype": "F32", "shape": [huge // 4], "data_offsets": [end, end + huge]}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    data = path.read_bytes()[8 + length :]
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)
        f.truncate(8 + len(text) + end + huge)  # sparse: no blocks on disk
    assert path.stat().st_size > huge

    read = []
    real_open = open

    class Counting:
        def __init__(self, *args, **kwargs):
            self.file = real_open(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def read(self, n=-1):
            assert n >= 0, "a read of the whole file"
            chunk = self.file.read(n)
            read.append(len(chunk))
            return chunk

        def seek(self, *args):
            return self.file.seek(*args)

    monkeypatch.setattr(inspect_module, "open", Counting, raising=False)
    info = inspect_lora(path)
    assert info["modules"] == expected
    assert info["bytes"] > huge
    alphas = sum(key.endswith(".alpha") for key in kohya_state)
    assert sum(read) <= 8 + len(text) + 8 * alphas + 0x10000, sum(read)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty file"),
        (b"\x05\x00\x00", "truncated"),
        (struct.pack("<Q", 0), "not a safetensors header"),
        (struct.pack("<Q", 1 << 40) + b"{}", "not a safetensors header"),
        (struct.pack("<Q", 100) + b"{}", "cut short"),
        (struct.pack("<Q", 4) + b"\xff\xfe{}", "not JSON"),
        (struct.pack("<Q", 2) + b"[]", "not an object"),
        (struct.pack("<Q", 13) + b'{"a": {"x":1}}'[:13], "not JSON"),
        (struct.pack("<Q", 14) + b'{"a": {"x":1}}', "not a tensor description"),
        (struct.pack("<Q", 26) + b'{"__metadata__": {"a": 1}}', "map of strings"),
    ],
)
def test_corrupt_headers_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(InspectError, match=message) as error:
        inspect_lora(path)
    assert "bad.safetensors" in str(error.value)
