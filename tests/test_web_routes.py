"""The inspector route: names outside the loras folders are refused before any file is read."""

import os

import pytest

from lora_loom.lora_core.writer import save_lora
from lora_loom.nodes import paths, web_routes

from util import make_lora


@pytest.fixture
def loras(tmp_path, tiny_fp32):
    models = tmp_path / "models"
    folder = models / "loras"
    (folder / "sub").mkdir(parents=True)
    lora = make_lora(tiny_fp32, seed=5, rank=4)
    save_lora(lora, folder / "good.safetensors")
    save_lora(lora, folder / "sub" / "nested.safetensors")
    (folder / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    (folder / "empty.safetensors").write_bytes(b"")
    (folder / "old.ckpt").write_bytes(b"PK")
    outside = tmp_path / "outside"
    outside.mkdir()
    save_lora(lora, outside / "secret.safetensors")
    os.symlink(outside / "secret.safetensors", folder / "link-out.safetensors")
    os.symlink(folder / "good.safetensors", folder / "link-in.safetensors")
    paths.set_models_dir(models)
    return folder


def test_a_listed_lora_is_described(loras):
    status, body = web_routes.lora_info("good.safetensors")
    assert status == 200, body
    assert body["name"] == "good.safetensors" and body["modules"]["unet"] > 0 and body["ranks"]["unet"] == [4]
    assert web_routes.lora_info("sub/nested.safetensors")[0] == 200
    assert web_routes.lora_info("link-in.safetensors")[0] == 200  # a link that stays inside is fine


@pytest.mark.parametrize(
    "name",
    [
        "../outside/secret.safetensors",
        "sub/../../outside/secret.safetensors",
        "/etc/passwd",
        "\\\\server\\share\\x.safetensors",
        "C:\\Windows\\win.ini",
        "sub\\..\\..\\outside\\secret.safetensors",
        "good.safetensors\0.txt",
        "..%2Foutside%2Fsecret.safetensors",
        "%2e%2e/outside/secret.safetensors",
        "%252e%252e%252foutside%252fsecret.safetensors",
        "%2Fetc%2Fpasswd",
        "good.safetensors%00",
    ],
)
def test_traversal_is_refused_without_reading_a_file(loras, monkeypatch, name):
    def no_read(*args, **kwargs):
        raise AssertionError("a file was read")

    monkeypatch.setattr(web_routes, "inspect_lora", no_read)
    status, body = web_routes.lora_info(name)
    assert status == 403, (name, status, body)
    assert "leaves the loras folders" in body["error"]


def test_a_link_that_leads_out_is_refused(loras, monkeypatch):
    monkeypatch.setattr(web_routes, "inspect_lora", lambda path: pytest.fail("read"))
    assert "link-out.safetensors" in paths.lora_choices()  # listed, as the host lists it, but not served
    status, body = web_routes.lora_info("link-out.safetensors")
    assert status == 403 and "leads out" in body["error"]


@pytest.mark.parametrize(
    "name, status, words",
    [
        (None, 400, "missing"),
        ("", 400, "missing"),
        ("x" * 2000, 400, "too long"),
        ("nothing-here.safetensors", 404, "no LoRA named"),
        ("corrupt.safetensors", 422, "not JSON"),
        ("empty.safetensors", 422, "empty file"),
        ("old.ckpt", 415, "only .safetensors"),
    ],
)
def test_other_bad_names_and_files_get_a_json_error(loras, name, status, words):
    got, body = web_routes.lora_info(name)
    assert got == status and words in body["error"], body


def test_training_messages_are_kept_per_node_for_a_reloaded_editor(monkeypatch):
    monkeypatch.setattr(web_routes, "_train_runs", {})
    for step in (1, 2, 3):
        web_routes.record_train_message({"node": "7", "step": step, "total": 3, "loss": 0.5})
    web_routes.record_train_message({"node": 9, "step": 1, "total": 5, "loss": 0.9})
    history = web_routes.train_history()
    assert [m["step"] for m in history["7"]] == [1, 2, 3] and [m["step"] for m in history["9"]] == [1]
    web_routes.record_train_message({"node": "7", "step": 1, "total": 3, "loss": 0.4})  # that node runs again
    assert [m["step"] for m in web_routes.train_history()["7"]] == [1]
    web_routes.record_train_message({"node": "7", "step": 2, "total": 3, "loss": 0.4, "prompt_id": "b"})
    assert [m["step"] for m in web_routes.train_history()["7"]] == [2]  # another queued run of that node
    monkeypatch.setattr(web_routes, "MAX_KEPT_MESSAGES", 10)
    for step in range(3, 31):
        web_routes.record_train_message({"node": "7", "step": step, "total": 30, "loss": 0.4, "prompt_id": "b"})
    assert [m["step"] for m in web_routes.train_history()["7"]] == list(range(21, 31))


def test_the_routes_through_aiohttp(loras, monkeypatch):
    """The same answers through a real aiohttp server, the way the host's PromptServer serves them."""
    import asyncio

    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    monkeypatch.setattr(web_routes, "_train_runs", {"3": [{"node": "3", "step": 1, "total": 2, "loss": 0.7}]})
    routes = web.RouteTableDef()
    web_routes.register_routes(routes)
    application = web.Application()
    application.add_routes(routes)

    async def ask() -> list:
        async with TestClient(TestServer(application)) as client:
            answers = []
            for query in ("good.safetensors", "sub/nested.safetensors", "../outside/secret.safetensors"):
                response = await client.get(web_routes.LORA_INFO_ROUTE, params={"name": query})
                answers.append((response.status, await response.json()))
            # Encoded by hand, as a crafted URL would be: %2e%2e%2f reaches the handler as "../".
            response = await client.get(web_routes.LORA_INFO_ROUTE + "?name=%2e%2e%2foutside%2fsecret.safetensors")
            answers.append((response.status, await response.json()))
            response = await client.get(web_routes.LORA_INFO_ROUTE + "?name=corrupt.safetensors")
            answers.append((response.status, await response.json()))
            response = await client.get(web_routes.TRAIN_HISTORY_ROUTE)
            answers.append((response.status, await response.json()))
            return answers

    good, nested, out, encoded, corrupt, history = asyncio.run(ask())
    assert good[0] == 200 and good[1]["modules"]["unet"] > 0 and nested[0] == 200
    assert out[0] == 403 and encoded[0] == 403 and "error" in out[1]
    assert corrupt[0] == 422 and "not JSON" in corrupt[1]["error"]
    assert history == (200, {"3": [{"node": "3", "step": 1, "total": 2, "loss": 0.7}]})
