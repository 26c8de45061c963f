"""The TrainLoRA node: its contract, its refusals, the file in the loras folder, Ctrl-C and resume headless."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lora_loom.nodes import impl, paths
from lora_loom.nodes.contract import TRAIN_LORA
from lora_loom.nodes.registry import NODE_CLASS_MAPPINGS

WORKFLOW = Path(__file__).resolve().parents[1] / "workflows" / "train_then_apply.json"
REPO = Path(__file__).resolve().parents[1]

# The issue's table: input names in order, with their widget defaults.
ISSUE_INPUTS = [
    ("base", "SD_BASE", None), ("dataset_dir", "STRING", None), ("caption_prefix", "STRING", ""),
    ("rank", "INT", 16), ("alpha", "FLOAT", 16.0), ("steps", "INT", 500), ("learning_rate", "FLOAT", 1e-4),
    ("text_encoder_lr", "FLOAT", 5e-5), ("batch_size", "INT", 1), ("resolution", "INT", 512), ("seed", "INT", 0),
    ("train_text_encoder", "BOOLEAN", False), ("target", "COMBO", "attention"), ("optimizer", "COMBO", "AdamW"),
    ("lr_scheduler", "COMBO", "constant"), ("warmup_steps", "INT", 0), ("min_snr_gamma", "FLOAT", 5.0),
    ("noise_offset", "FLOAT", 0.0), ("gradient_checkpointing", "BOOLEAN", False),
    ("mixed_precision", "COMBO", "fp32"), ("save_every_n_steps", "INT", 0), ("output_name", "STRING", "my-lora"),
]  # fmt: skip


def test_the_contract_is_the_issues_table():
    required = [i for i in TRAIN_LORA.inputs if not i.optional]
    assert [(i.name, i.type) for i in required] == [(n, t) for n, t, _ in ISSUE_INPUTS]
    for item, (_, _, default) in zip(required, ISSUE_INPUTS, strict=True):
        if default is not None:
            assert item.default == default, item.name
    assert TRAIN_LORA.input("rank").min == 1 and TRAIN_LORA.input("rank").max == 256
    assert TRAIN_LORA.input("target").choices() == ["attention", "kohya"]
    assert TRAIN_LORA.input("optimizer").choices() == ["AdamW", "AdamW8bit"]
    assert TRAIN_LORA.input("lr_scheduler").choices() == ["constant", "cosine", "linear"]
    assert TRAIN_LORA.input("mixed_precision").choices() == ["fp32", "bf16", "fp16"]
    assert [i.name for i in TRAIN_LORA.inputs if i.optional] == [
        "use_rslora", "validation_prompt", "validation_every_n_steps"
    ]  # fmt: skip
    assert [(o.type, o.name) for o in TRAIN_LORA.outputs] == [("LORA", "lora"), ("STRING", "lora_name"),
                                                              ("IMAGE", "loss_curve")]  # fmt: skip
    assert TRAIN_LORA.needs_grad and NODE_CLASS_MAPPINGS["TrainLoRA"].RETURN_TYPES == ("LORA", "STRING", "IMAGE")
    # The editor rounds a FLOAT widget to its step: the learning-rate defaults must survive that.
    for name in ("learning_rate", "text_encoder_lr"):
        item = TRAIN_LORA.input(name)
        assert round(item.default / item.step) * item.step == pytest.approx(item.default, rel=1e-9)


@pytest.mark.parametrize("name", ["a/b", "../escape", "..", "/tmp/abs", "C:\\lora", "sub\\x", "", "   ", "nul\x00byte"])
def test_output_names_that_leave_the_loras_folder_are_refused_before_anything_runs(name, tmp_path):
    paths.set_models_dir(tmp_path)
    with pytest.raises(ValueError, match="TrainLoRA: output_name .* nothing was written"):
        impl.train_lora(None, "anything", "", 16, 16.0, 1, 1e-4, 5e-5, 1, 64, 0, False, "attention", "AdamW",
                        "constant", 0, 5.0, 0.0, False, "fp32", 0, name)  # fmt: skip
    assert not any(tmp_path.rglob("*"))


def run_workflow(models: Path, output: Path, *extra: str, wait_for: str | None = None) -> tuple[int, str]:
    """The README's runner in a subprocess; with `wait_for`, Ctrl-C it once that text shows on stderr."""
    command = [sys.executable, "-m", "lora_loom", "run", str(WORKFLOW), "--models-dir", str(models)]
    command += ["--output-dir", str(output), *extra]
    process = subprocess.Popen(
        command, cwd=REPO.parent, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=os.environ.copy()
    )
    if wait_for is None:
        out, err = process.communicate(timeout=600)
        return process.returncode, out + err
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: process.stderr.read(1), "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while wait_for not in "".join(chunks) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    out = process.stdout.read()
    process.wait(timeout=300)
    reader.join(timeout=30)
    return process.returncode, out + "".join(chunks)


def test_ctrl_c_saves_the_state_and_the_same_workflow_resumes_to_the_uninterrupted_file(tmp_path):
    steps = ["--set", "2.steps=60"]
    code, text = run_workflow(tmp_path / "whole", tmp_path / "out1", *steps)
    assert code == 0, text[-2000:]
    whole = (tmp_path / "whole" / "loras" / "toy-star-trained.safetensors").read_bytes()

    models = tmp_path / "parts"
    code, text = run_workflow(models, tmp_path / "out2", *steps, wait_for="TrainLoRA toy-star-trained:")
    assert code == 130, text[-2000:]
    assert "run the same workflow again to resume" in text
    step = int(text.split("interrupted at step ")[1].split("/")[0])
    assert 0 < step < 60
    loras = models / "loras"
    assert (loras / "toy-star-trained.train-state").is_file()
    assert not (loras / "toy-star-trained.safetensors").exists()
    paths.set_models_dir(models)
    assert paths.list_models("loras") == []  # the state file is not a LoRA to pick

    code, text = run_workflow(models, tmp_path / "out3", *steps)
    assert code == 0, text[-2000:]
    assert f"resumed from step {step}/60" in text
    assert (loras / "toy-star-trained.safetensors").read_bytes() == whole
    assert paths.list_models("loras") == ["toy-star-trained.safetensors"]  # LoadLoRA lists it at once

    code, text = run_workflow(models, tmp_path / "out4", *steps)
    assert code == 0 and "already finished: returned the file, nothing trained" in text, text[-2000:]
    assert next((tmp_path / "out4" / "train_then_apply").glob("loss_curve_*.png")).is_file()


def node_inputs(**changes):
    inputs = {name: default for name, _, default in ISSUE_INPUTS if default is not None}
    inputs.update(rank=4, alpha=4.0, steps=4, learning_rate=1e-3, resolution=64)
    inputs.update(changes)
    return inputs


def test_a_relative_dataset_dir_is_in_the_input_folder_and_validation_samples_are_saved(tmp_path):
    from lora_loom.sd15.base import load_base

    from util import write_dataset

    write_dataset(tmp_path / "input" / "shapes", n=2)
    paths.set_models_dir(tmp_path / "models")
    paths.set_input_dir(tmp_path / "input")
    try:
        returned = impl.train_lora(
            load_base("tiny-sd15 (built-in)"),
            **node_inputs(dataset_dir="shapes", output_name="val", validation_every_n_steps=2),
            validation_prompt="a red circle",
        )
    finally:
        paths.set_input_dir("input")
    lora, name, curve = returned["result"]
    assert name == "val.safetensors" and (tmp_path / "models" / "loras" / name).is_file()
    assert curve.shape == (1, 320, 768, 3) and 0 <= curve.min() and curve.max() <= 1
    assert sorted(p.name for p in (tmp_path / "models" / "loras").glob("*.png")) == [
        "val-validation-step00000002.png", "val-validation-step00000004.png"
    ]  # fmt: skip
    assert "4 steps" in returned["ui"]["text"][0]


def test_a_missing_dataset_names_the_folder(tmp_path):
    from lora_loom.training.dataset import DatasetError

    paths.set_models_dir(tmp_path / "models")
    with pytest.raises(DatasetError, match=r"TrainLoRA: dataset_dir '.*no-such-set': .*no-such-set: no such folder"):
        impl.train_lora(None, **node_inputs(dataset_dir=str(tmp_path / "no-such-set")))
    assert not (tmp_path / "models").exists()


def test_out_of_memory_says_which_setting_to_lower(tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    from lora_loom.sd15.base import load_base
    from lora_loom.training.trainer import TrainingError

    from util import write_dataset

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(UNet2DConditionModel, "forward", no_memory)
    paths.set_models_dir(tmp_path / "models")
    dataset = write_dataset(tmp_path / "data", n=2)
    with pytest.raises(TrainingError, match="out of memory at step 1.*lower batch_size or resolution.*gradient_"):
        impl.train_lora(load_base("tiny-sd15 (built-in)"), **node_inputs(dataset_dir=str(dataset)))
