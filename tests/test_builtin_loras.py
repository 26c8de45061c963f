"""Built-in LoRAs: a kohya file shipped in sd15/builtin/loras/ is a LoadLoRA choice, loaded like a user's file."""

import pytest

from lora_loom.lora_core.writer import save_lora
from lora_loom.nodes import impl, paths, web_routes
from lora_loom.sd15 import builtin
from lora_loom.toyworld.evaluate import concept_prompt_set, concept_rate, sample_images
from lora_loom.toyworld.scenes import BASE_COLOURS, BASE_SHAPES

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


# The shipped LoRAs on the shipped base: each concept read by the scorer on a fixed prompt set (a seed no
# training set uses), with the LoRA at strength 0 (the base, which never saw the concept) and at 1.
CONCEPT_PAIRS = 32
CONCEPT_SEED = 4242  # neither training (0), the built-in sets (0-2), the benchmarks (12345) nor PROMPT_SEED (777)
NEAR_CHANCE = 0.10  # the base never saw star or cyan: measured 0 / 3.1 / 0 % here at strength 0
# Issue 16's goal at strength 1 is 90 %; today's LoRAs (the protocol's default settings) are far short of it
# (measured here: 25 / 65.6 / 25 %; 30 / 56 / 19 % over 100 pairs in docs/benchmarks.md), so each is held to a
# floor below its measurement until better-trained files ship.
SHIPPED = (
    ("toy-star (built-in)", ("star",), BASE_COLOURS, ("shape",), 0.15),
    ("toy-cyan (built-in)", BASE_SHAPES, ("cyan",), ("colour",), 0.45),
    ("toy-cyan-star (built-in)", ("star",), ("cyan",), ("shape", "colour"), 0.15),
)


@pytest.mark.parametrize(("name", "shapes", "colours", "attributes", "floor"), SHIPPED, ids=[row[0] for row in SHIPPED])
def test_a_shipped_lora_raises_its_concept_from_near_chance(name, shapes, colours, attributes, floor):
    base = impl.load_base(builtin.BUILT_IN_TOY, "fp32")[0]
    lora = impl.load_lora(name)["result"][0]
    pairs = concept_prompt_set(CONCEPT_PAIRS, shapes, colours, seed=CONCEPT_SEED)

    def rate(strength: float) -> float:
        images = sample_images(base.with_lora(lora, strength, strength), pairs, sampler="euler", cfg=2.0, steps=20)
        return concept_rate(images, pairs.truth, attributes)

    without, with_lora = rate(0.0), rate(1.0)
    assert without <= NEAR_CHANCE, (name, without)
    assert with_lora >= floor, (name, with_lora)
