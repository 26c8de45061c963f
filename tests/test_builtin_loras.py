"""Built-in LoRAs: a kohya file shipped in sd15/builtin/loras/ is a LoadLoRA choice, loaded like a user's file."""

import pytest

from lora_loom.lora_core.writer import save_lora
from lora_loom.nodes import impl, paths, web_routes
from lora_loom.sd15 import builtin

from util import make_lora


@pytest.fixture
def shipped(tmp_path, tiny_fp32, monkeypatch):
    folder = tmp_path / "package" / "loras"
    folder.mkdir(parents=True)
    save_lora(make_lora(tiny_fp32, seed=3, rank=4), folder / "toy-test.safetensors")
    (folder / "notes.txt").write_text("not a LoRA")
    monkeypatch.setattr(builtin, "BUILT_IN_LORA_DIR", folder)
    models = tmp_path / "models"
    (models / "loras").mkdir(parents=True)
    save_lora(make_lora(tiny_fp32, seed=4, rank=2), models / "loras" / "mine.safetensors")
    paths.set_models_dir(models)
    return folder


def test_built_ins_come_first_in_the_list_then_the_users_files(shipped):
    assert paths.lora_choices() == ["toy-test (built-in)", "mine.safetensors"]
    assert paths.model_path("loras", "toy-test (built-in)") == shipped / "toy-test.safetensors"
    assert paths.model_path("loras", "toy-test.safetensors") is None  # only under its built-in name


def test_a_built_in_loads_through_the_users_path(shipped, tiny_fp32):
    ui_and_result = impl.load_lora("toy-test (built-in)")
    lora = ui_and_result["result"][0]
    assert lora.report.source == "toy-test (built-in)"  # no package path reaches the browser
    assert lora.report.summary() in ui_and_result["ui"]["text"][0]
    assert impl.file_fingerprint("loras", "toy-test (built-in)") != "missing"


def test_the_inspector_serves_built_ins_and_still_refuses_the_rest(shipped):
    status, body = web_routes.lora_info("toy-test (built-in)")
    assert status == 200, body
    assert body["name"] == "toy-test (built-in)" and body["ranks"]["unet"] == [4]
    assert web_routes.lora_info("../package/loras/toy-test.safetensors")[0] == 403


def test_no_folder_no_built_ins(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin, "BUILT_IN_LORA_DIR", tmp_path / "absent")
    paths.set_models_dir(tmp_path / "models")
    assert paths.lora_choices() == []
