"""Resume states without pickle: the same tree back, bitwise and in the same memory layout."""

import math

import pytest
import torch
from safetensors.torch import save_file

from lora_loom.lora_core.state_files import StateFileError, load_state, save_state


def test_an_optimizer_state_comes_back_bitwise_with_its_types(tmp_path):
    model = torch.nn.Conv2d(3, 4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    for _ in range(2):
        model(torch.randn(2, 3, 8, 8)).square().mean().backward()
        optimizer.step()
    tree = {
        "optimizer": optimizer.state_dict(),  # {"state": {0: {...}, 1: {...}}, "param_groups": [...]} : int keys
        "generator": torch.Generator().manual_seed(3).get_state(),
        "floats": [0.1, 1e-300, math.inf, -0.0],
        "flags": (True, None, "text"),
        "__odd__": {"__tensor__": 1},  # keys that look like the format's own tags
        "half": torch.randn(5, dtype=torch.bfloat16),
    }
    back = load_state(save_state(tmp_path / "s.safetensors", tree))
    assert back["optimizer"]["param_groups"] == optimizer.state_dict()["param_groups"]
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.99)  # a tuple again
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            assert torch.equal(back["optimizer"]["state"][index][name], value), (index, name)
    assert torch.equal(back["generator"], tree["generator"]) and back["generator"].dtype == torch.uint8
    assert back["floats"][:3] == [0.1, 1e-300, math.inf] and math.copysign(1, back["floats"][3]) == -1
    assert back["flags"] == (True, None, "text") and back["__odd__"] == {"__tensor__": 1}
    assert back["half"].dtype == torch.bfloat16 and torch.equal(back["half"], tree["half"])
    fresh = torch.optim.AdamW(torch.nn.Conv2d(3, 4, 3).parameters(), lr=1e-3)
    fresh.load_state_dict(back["optimizer"])  # torch takes it as its own


def test_memory_layout_survives(tmp_path):
    """A channels-last tensor (what a VAE's encoder returns) comes back channels-last: kernels round
    differently on the two layouts, so a resumed training run would otherwise not be bitwise."""
    channels_last = torch.randn(2, 4, 3, 5).to(memory_format=torch.channels_last)
    transposed = torch.randn(6, 7).T
    back = load_state(save_state(tmp_path / "s.safetensors", {"a": channels_last, "b": transposed}))
    assert back["a"].stride() == channels_last.stride() and torch.equal(back["a"], channels_last)
    assert back["b"].stride() == transposed.stride() and torch.equal(back["b"], transposed)


def test_files_that_are_not_states_are_refused_without_running_anything(tmp_path):
    pickled = tmp_path / "evil.safetensors"
    torch.save({"code": print}, pickled)
    with pytest.raises(StateFileError, match="evil.safetensors: not a readable state file"):
        load_state(pickled)
    plain = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(StateFileError, match="not a LoRA Loom state file"):
        load_state(plain)
    with pytest.raises(TypeError, match="cannot store a builtin_function_or_method"):
        save_state(tmp_path / "x.safetensors", {"f": print})
    assert not (tmp_path / "x.safetensors").exists()
