"""What ComfyUI needs from the folder: importable under any name, no host imports outside the host."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_lora_core_and_sd15_never_import_comfyui():
    pattern = re.compile(r"^\s*(import|from)\s+(comfy|comfy_api|folder_paths|nodes|execution)\b", re.MULTILINE)
    files = [*(ROOT / "lora_core").rglob("*.py"), *(ROOT / "sd15").rglob("*.py")]
    assert len(files) > 15
    offenders = [p.name for p in files if pattern.search(p.read_text())]
    assert offenders == []


def test_loads_under_an_arbitrary_module_name_without_the_host():
    code = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("LoRA-Loom", {str(ROOT / "__init__.py")!r},
                                              submodule_search_locations=[{str(ROOT)!r}])
module = importlib.util.module_from_spec(spec)
sys.modules["LoRA-Loom"] = module
spec.loader.exec_module(module)
assert sorted(module.NODE_CLASS_MAPPINGS) == [
    "ApplyLoRA", "ApplyLoRAToModel", "ComfyToLoom", "FuseLoRA", "LoadBase", "LoadLoRA", "LoomImageGrid",
    "LoomToComfy", "Sampler", "TrainLoRA"
]
assert module.WEB_DIRECTORY == "./web"
for cls in module.NODE_CLASS_MAPPINGS.values():
    types = cls.INPUT_TYPES()
    assert "required" in types and cls.FUNCTION == "execute"
assert not any(name == "comfy" or name.startswith("comfy.") or name == "folder_paths" for name in sys.modules)
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


def test_v1_contract_matches_the_issue():
    from lora_loom.nodes.registry import NODE_CLASS_MAPPINGS

    sampler = NODE_CLASS_MAPPINGS["Sampler"].INPUT_TYPES()["required"]
    assert list(sampler) == [
        "base",
        "prompt",
        "negative_prompt",
        "seed",
        "steps",
        "cfg",
        "sampler_name",
        "scheduler",
        "width",
        "height",
        "batch_size",
    ]
    assert NODE_CLASS_MAPPINGS["Sampler"].RETURN_TYPES == ("IMAGE", "LATENT")
    apply = NODE_CLASS_MAPPINGS["ApplyLoRA"].INPUT_TYPES()["required"]
    kind, options = apply["strength_unet"]
    assert kind == "FLOAT" and {k: options[k] for k in ("default", "min", "max", "step")} == {
        "default": 1.0,
        "min": -10.0,
        "max": 10.0,
        "step": 0.01,
    }
    assert list(apply) == ["base", "lora", "strength_unet", "strength_text_encoder"]
    # The trained toy-world base is the editor's default choice; the random tiny base stays available.
    assert NODE_CLASS_MAPPINGS["LoadBase"].INPUT_TYPES()["required"]["ckpt_name"][0][:2] == [
        "toy-world-sd15 (built-in)",
        "tiny-sd15 (built-in)",
    ]
    grid = NODE_CLASS_MAPPINGS["LoomImageGrid"].INPUT_TYPES()
    assert list(grid["required"]) == ["row_1", "row_labels", "upscale"]
    assert list(grid["optional"]) == [*(f"row_{i}" for i in range(2, 7)), "layout"]
    assert importlib.util.find_spec("lora_loom.lora_core") is not None
