"""LoRA Loom on ComfyUI's own MODEL / CLIP / VAE, in a real ComfyUI (imported in-process).

Needs a ComfyUI checkout (Comfy-Org/ComfyUI) and its requirements in the Python that runs pytest:
`python scripts/host_tests.py --comfyui /path/to/ComfyUI --python /path/to/its/python` sets it up and runs this
file. Without a host configured the whole file is skipped, saying so.
"""

import os
import sys
from pathlib import Path

import pytest

COMFYUI = os.environ.get("LORA_LOOM_COMFYUI", "")
if not COMFYUI:
    pytest.skip(
        "no ComfyUI host configured: set LORA_LOOM_COMFYUI=/path/to/ComfyUI and run with the host's Python "
        "(scripts/host_tests.py does both)",
        allow_module_level=True,
    )
sys.path.insert(0, str(Path(COMFYUI).resolve()))
try:
    import comfy.cli_args
    import torch

    comfy.cli_args.args.cpu = not torch.cuda.is_available()  # what `main.py --cpu` sets, before the host looks
    import comfy.model_management  # noqa: F401
    import comfy.sd  # noqa: F401
except ImportError as error:
    pytest.skip(f"ComfyUI at {COMFYUI} does not import in this Python: {error}", allow_module_level=True)

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from lora_loom.lora_core.formats import load_lora  # noqa: E402
from lora_loom.lora_core.synthetic import random_kohya_lora  # noqa: E402
from lora_loom.lora_core.targets import kohya_targets  # noqa: E402
from lora_loom.nodes.comfy_bridge import apply_lora_to_model, comfy_to_loom, loom_to_comfy  # noqa: E402
from lora_loom.sd15.base import load_base  # noqa: E402
from lora_loom.sd15.builtin import BUILT_IN_TINY  # noqa: E402
from lora_loom.sd15.keys import (  # noqa: E402
    HOST_TEXT_ENCODER_PREFIX,
    HOST_UNET_PREFIX,
    TEXT_ENCODER_PREFIX,
    UNET_PREFIX,
    host_weight_key,
)
from lora_loom.sd15.models import components_state_dict_ldm  # noqa: E402

from util import attention_processor_state, peft_state_for_kohya_converter  # noqa: E402

FIXTURES = Path(__file__).parent / "data" / "comfyui"


def host_name(checkpoint_key: str) -> str | None:
    if checkpoint_key.startswith(UNET_PREFIX):
        return HOST_UNET_PREFIX + checkpoint_key[len(UNET_PREFIX) :]
    if checkpoint_key.startswith(TEXT_ENCODER_PREFIX):
        return HOST_TEXT_ENCODER_PREFIX + checkpoint_key[len(TEXT_ENCODER_PREFIX) :]
    return None


def our_weights(handle) -> dict[str, torch.Tensor]:
    """The handle's U-Net and text-encoder weights under the host's names, as our engine patches them."""
    with handle.model.lock:
        handle.activate()
        state = components_state_dict_ldm(handle.model.components)
        return {host_name(k): v.detach().cpu().clone() for k, v in state.items() if host_name(k)}


def host_weights(model, clip) -> dict[str, torch.Tensor]:
    """The host's weights with its patches applied by its own ModelPatcher, then unpatched again.

    Called once on LoomToComfy's own MODEL/CLIP before on their clones: the host's CLIP is loaded when it is
    built, and `patch_model` on a clone skips weights that load left flagged as patched (in the server,
    `load_models_gpu` unpatches the other clone first)."""
    found = {}
    for patcher in (model, clip.patcher):
        patcher.patch_model()
        try:
            found.update({k: v.detach().cpu().clone() for k, v in patcher.model.state_dict().items()})
        finally:
            patcher.unpatch_model()
    return found


# ---- LoRA files as different tools write them, for the tiny base --------------------------------------------


def kohya_file(base, folder: Path) -> Path:
    parts = {"unet": base.model.components.unet, "text_encoder": base.model.components.text_encoder}
    targets = kohya_targets("all") + ["unet.down_blocks.1.resnets.0.conv1", "unet.mid_block.resnets.1.conv2"]
    path = folder / "kohya.safetensors"
    save_file(random_kohya_lora(parts, targets, rank=4, alpha=2.0, seed=3), str(path))
    return path


def locon_tucker_file(base, folder: Path) -> Path:
    conv = "lora_unet_down_blocks_1_resnets_0_conv1"  # 3x3 conv, 64 -> 64 in the tiny model
    g = torch.Generator().manual_seed(5)
    state = {
        f"{conv}.lora_down.weight": torch.randn(2, 32, 1, 1, generator=g),
        f"{conv}.lora_mid.weight": torch.randn(2, 2, 3, 3, generator=g),
        f"{conv}.lora_up.weight": torch.randn(64, 2, 1, 1, generator=g),
        f"{conv}.alpha": torch.tensor(1.0),
    }
    path = folder / "locon.safetensors"
    save_file(state, str(path))
    return path


def diffusers_peft_file(base, folder: Path) -> Path:
    """diffusers' own saver (`save_lora_weights`) of PEFT layers: the names the host's LoraLoader misreads."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    from lora_loom.sd15.models import build_components

    model = build_components("tiny-sd15", seed=0)
    unet_config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["to_q", "to_v", "proj_in"])
    te_config = LoraConfig(r=2, lora_alpha=1, init_lora_weights=False, target_modules=["q_proj", "fc1"])
    torch.manual_seed(3)
    inject_adapter_in_model(unet_config, model.unet)
    inject_adapter_in_model(te_config, model.text_encoder)
    out = folder / "diffusers"
    StableDiffusionPipeline.save_lora_weights(
        out,
        unet_lora_layers=get_peft_model_state_dict(model.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(model.text_encoder),
    )
    return out / "pytorch_lora_weights.safetensors"


def peft_save_pretrained_file(base, folder: Path) -> Path:
    """PEFT's own `save_pretrained` of a PEFT U-Net: `base_model.model.…` names, alpha in adapter_config.json."""
    from peft import LoraConfig, get_peft_model

    from lora_loom.sd15.models import build_components

    model = build_components("tiny-sd15", seed=0)
    torch.manual_seed(7)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["to_k", "to_out.0", "conv1"])
    out = folder / "peft"
    get_peft_model(model.unet, config).save_pretrained(out)
    return out / "adapter_model.safetensors"


def diffusers_to_kohya_file(base, folder: Path) -> Path:
    """diffusers' converter of PEFT layers to kohya names (`convert_state_dict_to_kohya`, as exporters use it)."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    peft_state = peft_state_for_kohya_converter()
    path = folder / "diffusers-kohya.safetensors"
    save_file(convert_state_dict_to_kohya(peft_state), str(path))
    return path


def diffusers_attn_processor_file(base, folder: Path) -> Path:
    """Old diffusers attention-processor names (`….processor.to_q_lora.up.weight`), U-Net attention only."""
    state = attention_processor_state(load_lora(kohya_file(base, folder)))
    path = folder / "attn-procs.safetensors"
    save_file(state, str(path))
    return path


def comfyui_trainer_file(base, folder: Path) -> Path:
    return FIXTURES / "comfyui_trained_lora.safetensors"  # written by ComfyUI's own Train LoRA node


WRITERS = {
    "kohya": kohya_file,
    "locon-tucker": locon_tucker_file,
    "diffusers-peft": diffusers_peft_file,
    "comfyui-trainer": comfyui_trainer_file,
    "peft-save-pretrained": peft_save_pretrained_file,
    "diffusers-to-kohya": diffusers_to_kohya_file,
    "diffusers-attn-processor": diffusers_attn_processor_file,
}


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_apply_lora_to_model_patches_the_hosts_weights_to_ours(writer, dtype, tmp_path):
    base = load_base(BUILT_IN_TINY, dtype=dtype, device="cpu")
    lora = load_lora(WRITERS[writer](base, tmp_path))
    model, clip, _ = loom_to_comfy(base)
    before = host_weights(model, clip)
    assert before.keys() >= our_weights(base).keys()
    for key, value in our_weights(base).items():
        assert torch.equal(before[key], value), key  # LoomToComfy hands over the weights as they are

    patched_model, patched_clip = apply_lora_to_model(model, clip, lora, 0.8, 0.6)
    ours = our_weights(base.with_lora(lora, 0.8, 0.6))
    theirs = host_weights(patched_model, patched_clip)
    changed = {k for k in ours if not torch.equal(ours[k], before[k])}
    assert changed and changed <= {host_weight_key(target) for target in lora.adapters}
    for key in ours:
        assert torch.equal(theirs[key], ours[key]), key
    # The inputs are untouched, and the host's restore gives W0 back.
    after = host_weights(model, clip)
    assert [k for k in ours if not torch.equal(after[k], before[k])] == []


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_loom_to_comfy_shares_the_weights_and_keeps_its_state_when_the_base_moves_on(dtype, tmp_path):
    """No second copy: the host's MODEL and CLIP hold our very tensors. Another branch of the same base applying a
    LoRA afterwards (our engine writes in place) leaves them as they were handed over: copy-on-write."""
    base = load_base(BUILT_IN_TINY, dtype=dtype, device="cpu")
    lora = load_lora(kohya_file(base, tmp_path))
    styled = base.with_lora(lora, 0.9, 0.5)
    model, clip, _ = loom_to_comfy(styled)
    handed = our_weights(styled)
    ours = {host_name(k): v for k, v in components_state_dict_ldm(base.model.components).items() if host_name(k)}
    theirs = {**model.model.state_dict(), **clip.patcher.model.state_dict()}
    assert [k for k in ours if theirs[k].data_ptr() != ours[k].data_ptr()] == []  # the same memory

    other = our_weights(base.with_lora(lora, -1.0, 2.0))  # the shared model moves to another handle's state
    assert [k for k in handed if not torch.equal(other[k], handed[k])]  # it did change our weights
    now = host_weights(model, clip)
    assert [k for k in handed if not torch.equal(now[k], handed[k])] == []


# ---- the real server: V1 and V3 serving, a graph through the host's KSampler -------------------------------

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from editor_check import free_port, tracebacks, wait_for  # noqa: E402

OUR_NODES = ("LoadBase", "LoadLoRA", "ApplyLoRA", "FuseLoRA", "TrainLoRA", "Sampler", "LoomImageGrid")
OUR_NODES += ("ApplyLoRAToModel", "LoomToComfy", "ComfyToLoom")


class Server:
    def __init__(self, api: str, folder: Path) -> None:
        import subprocess

        self.api, self.output, self.log_path = api, folder / "output", folder / "server.log"
        self.url = f"http://127.0.0.1:{free_port()}"
        env = {**os.environ, "LORA_LOOM_NODE_API": api}
        port = self.url.rsplit(":", 1)[1]
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", port,
                 "--output-directory", str(self.output)],
                cwd=COMFYUI, env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_for(f"{self.url}/object_info/LoadBase", self.process)

    def get(self, path: str):
        import json
        import urllib.request

        with urllib.request.urlopen(self.url + path, timeout=60) as response:
            return json.loads(response.read())

    def run(self, prompt: dict, seconds: float = 300) -> dict:
        """POST /prompt, then wait for its history entry."""
        import json
        import time
        import urllib.request

        body = json.dumps({"prompt": prompt, "client_id": "lora-loom-tests"}).encode()
        request = urllib.request.Request(self.url + "/prompt", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        assert answer.get("node_errors") == {}, answer
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            history = self.get(f"/history/{answer['prompt_id']}")
            if answer["prompt_id"] in history and history[answer["prompt_id"]]["status"].get("completed") is not None:
                return history[answer["prompt_id"]]
            time.sleep(1)
        raise AssertionError(f"prompt {answer['prompt_id']} did not finish in {seconds:.0f} s")

    def close(self) -> str:
        self.process.terminate()
        self.process.wait(timeout=60)
        return self.log_path.read_text()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """One host serving our V1 classes (LORA_LOOM_NODE_API=v1), one our V3 classes (the default)."""
    started = {}
    try:
        for api in ("v1", "v3"):
            started[api] = Server(api, tmp_path_factory.mktemp(f"comfyui-{api}"))
        yield started
    finally:
        for server in started.values():
            log = server.close()
            assert [block for block in tracebacks(log) if "lora_loom" in block] == [], server.api


def hidden_as_v1(described: dict) -> dict:
    """The host spells a V1 hidden input "PROMPT" and a V3 one ["PROMPT"] (its V1 executor compares strings)."""
    hidden = {
        name: value[0] if isinstance(value, list) else value for name, value in described.get("hidden", {}).items()
    }
    return {**described, "hidden": hidden} if hidden else described


def test_v1_and_v3_serve_the_same_node_descriptions(servers):
    v1, v3 = (servers[api].get("/object_info") for api in ("v1", "v3"))
    for node in OUR_NODES:
        assert node in v1 and node in v3, node
        assert hidden_as_v1(v1[node]["input"]) == hidden_as_v1(v3[node]["input"]), node
        for field in ("input_order", "output", "output_name", "output_node", "category", "display_name"):
            assert v1[node][field] == v3[node][field], (node, field)
    # Which classes answered: the host describes a V3 class with fields it sets for no V1 class of ours.
    assert all("api_node" in v3[node] and "api_node" not in v1[node] for node in OUR_NODES)
    assert v3["LoadBase"]["python_module"] == v1["LoadBase"]["python_module"] == "custom_nodes.lora_loom"


def test_start_up_log_has_no_warning_about_the_pack(servers):
    for server in servers.values():
        lines = server.log_path.read_text().splitlines()
        ours = [
            line
            for line in lines
            if "lora_loom" in line.lower() and ("warn" in line.lower() or "error" in line.lower())
        ]
        assert ours == [], server.api


def ksampler_prompt(seed: int) -> dict:
    """LoadBase → ApplyLoRA → LoomToComfy → CLIPTextEncode / KSampler / VAEDecode → SaveImage."""
    return {
        "1": {"class_type": "LoadBase", "inputs": {"ckpt_name": "toy-world-sd15 (built-in)", "dtype": "fp32"}},
        "2": {"class_type": "LoadLoRA", "inputs": {"lora_name": "demo-attention.safetensors"}},
        "3": {"class_type": "ApplyLoRA", "inputs": {"base": ["1", 0], "lora": ["2", 0], "strength_unet": 0.5,
                                                     "strength_text_encoder": 0.5}},
        "4": {"class_type": "LoomToComfy", "inputs": {"base": ["3", 0]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "a red circle on blue"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": ""}},
        "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "positive": ["5", 0], "negative": ["6", 0],
                                                    "latent_image": ["7", 0], "seed": seed, "steps": 4, "cfg": 2.0,
                                                    "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["4", 2]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "loom_ksampler"}},
    }  # fmt: skip


@pytest.mark.parametrize("api", ["v1", "v3"])
def test_a_graph_through_loom_to_comfy_and_ksampler_runs_in_the_host(servers, api):
    from lora_loom.demo import write_demo_files

    write_demo_files(Path(COMFYUI) / "models")  # demo-attention.safetensors in the host's loras folder
    history = servers[api].run(ksampler_prompt(seed=3))
    assert history["status"]["status_str"] == "success", history["status"]
    images = history["outputs"]["10"]["images"]
    assert len(images) == 1 and (servers[api].output / images[0]["filename"]).is_file()


@pytest.mark.parametrize("api", ["v1", "v3"])
def test_the_shipped_training_workflow_runs_in_the_host(servers, api):
    """workflows/train_then_apply.json, as the editor would queue it (our converter gives the same prompt as the
    frontend, tests/test_frontend_workflows.py), shortened: TrainLoRA's hidden node id, autograd inside the
    host's inference mode and the image outputs, in both APIs."""
    from lora_loom.runner.defaults import default_schemas
    from lora_loom.runner.workflow import load_workflow

    root = Path(__file__).resolve().parents[1]
    prompt = load_workflow(root / "workflows" / "train_then_apply.json", default_schemas()).prompt
    for node in prompt.values():
        if node["class_type"] == "TrainLoRA":
            node["inputs"].update(steps=2, output_name=f"host-test-{api}")
        if node["class_type"] == "Sampler":
            node["inputs"].update(steps=2, batch_size=1)
    history = servers[api].run(prompt, seconds=600)
    assert history["status"]["status_str"] == "success", history["status"]
    saved = [image for output in history["outputs"].values() for image in output.get("images", [])]
    assert len(saved) == 2 and all((servers[api].output / i["subfolder"] / i["filename"]).is_file() for i in saved)


def test_every_shipped_workflow_is_a_template_with_its_thumbnail(servers):
    """The editor's template browser lists `GET /workflow_templates` and shows `<name>.jpg` from the pack."""
    import urllib.request

    root = Path(__file__).resolve().parents[1]
    shipped = sorted(p.stem for p in (root / "workflows").glob("*.json"))
    server = servers["v3"]
    assert sorted(server.get("/workflow_templates")["lora_loom"]) == shipped
    for name in shipped:
        for suffix, kind in ((".json", "application/json"), (".jpg", "image/jpeg")):
            url = f"{server.url}/api/workflow_templates/lora_loom/{name}{suffix}"
            with urllib.request.urlopen(url, timeout=30) as response:
                assert response.status == 200 and response.headers["Content-Type"].startswith(kind), url


def test_comfy_to_loom_takes_the_hosts_patched_weights_as_a_base_of_its_own(tmp_path):
    """MODEL/CLIP (with a LoRA the host patches in) and VAE back to an SD_BASE: our weights are the host's, and our
    engine then patches and restores them without touching the host's."""
    base = load_base(BUILT_IN_TINY, dtype="fp32", device="cpu")
    lora = load_lora(kohya_file(base, tmp_path))
    model, clip, vae = loom_to_comfy(base)
    patched_model, patched_clip = apply_lora_to_model(model, clip, lora, 0.7, 0.4)
    (back,) = comfy_to_loom(patched_model, patched_clip, vae)
    host = host_weights(patched_model, patched_clip)
    ours = our_weights(back)
    assert ours.keys() and [k for k in ours if not torch.equal(ours[k], host[k])] == []
    assert all(torch.equal(v, our_weights(base.with_lora(lora, 0.7, 0.4))[k]) for k, v in ours.items())
    vae_ours = {k: v for k, v in components_state_dict_ldm(back.model.components).items() if k.startswith("first")}
    vae_base = {k: v for k, v in components_state_dict_ldm(base.model.components).items() if k.startswith("first")}
    assert vae_ours.keys() == vae_base.keys() and all(torch.equal(vae_ours[k], vae_base[k]) for k in vae_ours)
    second = back.with_lora(lora, 1.0, 1.0)
    assert not torch.equal(our_weights(second)["diffusion_model.input_blocks.1.1.proj_in.weight"],
                           ours["diffusion_model.input_blocks.1.1.proj_in.weight"])  # fmt: skip
    assert all(torch.equal(v, ours[k]) for k, v in our_weights(back).items())  # restored exactly
    assert all(torch.equal(v, host[k]) for k, v in host_weights(patched_model, patched_clip).items() if k in ours)
