"""The nodes end to end on the built-in tiny base: pixels vs diffusers, branches, fuse/save, errors."""

import pytest
import torch
from safetensors.torch import save_file

from lora_loom.lora_core.synthetic import random_kohya_lora
from lora_loom.lora_core.targets import kohya_targets
from lora_loom.nodes import impl, paths
from lora_loom.sd15.base import BUILT_IN_TINY, built_in_tiny_checkpoint
from lora_loom.sd15.config_files import config_dir

SMALL = {"steps": 3, "cfg": 5.0, "width": 64, "height": 64, "batch_size": 2}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    (root / "checkpoints").mkdir()
    (root / "loras").mkdir()
    base = impl.load_base(BUILT_IN_TINY)[0]
    parts = {"unet": base.model.components.unet, "text_encoder": base.model.components.text_encoder}
    for seed, scope in ((1, "all"), (2, "attention")):
        state = random_kohya_lora(parts, kohya_targets(scope), rank=4, alpha=4, seed=seed, scale=0.3)
        save_file(state, str(root / "loras" / f"style{seed}.safetensors"))
    paths.set_models_dir(root)
    return root


def run_sampler(base, prompt="a red circle", seed=7, **overrides):
    settings = {**SMALL, "sampler_name": "euler", "scheduler": "normal", **overrides}
    return impl.sampler(base, prompt, "blurry", seed, **settings)


def test_same_inputs_same_pixels_and_loras_change_them(models):
    base = impl.load_base(BUILT_IN_TINY)[0]
    style = impl.load_lora("style1.safetensors")["result"][0]
    plain = run_sampler(base)[0]
    assert plain.shape == (2, 64, 64, 3) and plain.dtype == torch.float32
    assert 0.0 <= plain.min() and plain.max() <= 1.0
    assert torch.equal(plain, run_sampler(base)[0])
    styled = run_sampler(impl.apply_lora(base, style, 1.0, 1.0)[0])[0]
    assert (styled - plain).abs().max() > 1e-2
    assert torch.equal(run_sampler(impl.apply_lora(base, style, 0.0, 0.0)[0])[0], plain)


def test_branches_are_independent_in_any_order(models):
    base = impl.load_base(BUILT_IN_TINY)[0]
    one = impl.load_lora("style1.safetensors")["result"][0]
    two = impl.load_lora("style2.safetensors")["result"][0]
    left = impl.apply_lora(base, one, 0.8, 0.5)[0]
    right = impl.apply_lora(impl.apply_lora(base, two, 1.0, 1.0)[0], one, -0.5, 0.0)[0]

    alone_left = run_sampler(left)[0]
    alone_right = run_sampler(
        impl.apply_lora(impl.apply_lora(impl.load_base(BUILT_IN_TINY)[0], two, 1.0, 1.0)[0], one, -0.5, 0.0)[0]
    )[0]
    assert torch.equal(run_sampler(right)[0], alone_right)
    assert torch.equal(run_sampler(left)[0], alone_left)
    assert torch.equal(run_sampler(base)[0], run_sampler(impl.load_base(BUILT_IN_TINY)[0])[0])


def test_fuse_and_save_reads_back_identically(models):
    from diffusers import UNet2DConditionModel

    base = impl.load_base(BUILT_IN_TINY)[0]
    style = impl.load_lora("style1.safetensors")["result"][0]
    out = impl.fuse_lora(impl.apply_lora(base, style, 0.7, 0.3)[0], "fused-test", save_fp16=False)
    fused = out["result"][0]
    saved = models / "checkpoints" / "fused-test.safetensors"
    assert saved.is_file() and out["ui"]["text"][0] == "saved checkpoints/fused-test.safetensors"
    assert fused.patches == () and len(fused.fused) == 1

    reloaded = impl.load_base("fused-test.safetensors")[0]
    fused.activate()
    for name in ("unet", "text_encoder", "vae"):
        ours, theirs = (getattr(b.model.components, name).state_dict() for b in (fused, reloaded))
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    diffusers_unet = UNet2DConditionModel.from_single_file(
        saved, config=str(config_dir("tiny-sd15")), subfolder="unet", local_files_only=True
    )
    fused_unet = fused.model.components.unet.state_dict()
    assert all(torch.equal(v, fused_unet[k].cpu()) for k, v in diffusers_unet.state_dict().items())
    # downstream of the fuse, more LoRAs stack on the fused base; upstream is untouched
    assert torch.equal(run_sampler(fused)[0], run_sampler(reloaded)[0])

    impl.fuse_lora(impl.apply_lora(base, style, 0.7, 0.3)[0], "fused-half", save_fp16=True)
    half = impl.load_base("fused-half.safetensors", "fp16")[0]
    assert half.model.dtype == torch.float16
    fused_half = {k: v.half().cpu() for k, v in fused.model.components.unet.state_dict().items()}
    assert all(torch.equal(v.cpu(), fused_half[k]) for k, v in half.model.components.unet.state_dict().items())


def test_errors_name_the_node_and_leave_the_model_alone(models, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"LoadBase: checkpoint 'missing.safetensors' not found"):
        impl.load_base("missing.safetensors")
    with pytest.raises(FileNotFoundError, match=r"LoadLoRA: LoRA 'missing.safetensors' not found"):
        impl.load_lora("missing.safetensors")
    base = impl.load_base(BUILT_IN_TINY)[0]
    before = {k: v.clone() for k, v in base.model.components.unet.state_dict().items()}
    alien = {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(4, 999),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.ones(32, 4),
    }
    save_file(alien, str(models / "loras" / "alien.safetensors"))
    lora = impl.load_lora("alien.safetensors")["result"][0]
    with pytest.raises(Exception, match=r"LoRA 'alien.safetensors' does not fit unet\.down_blocks\.0"):
        impl.apply_lora(base, lora, 1.0, 1.0)
    after = base.model.components.unet.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_latent_is_comfyui_scaled_and_decodes_to_the_image(models):
    """ComfyUI's LATENT holds VAE-space latents (its VAEDecode applies no scaling factor)."""
    base = impl.load_base(BUILT_IN_TINY)[0]
    image, latent = run_sampler(base)
    vae = base.model.components.vae
    with torch.no_grad():
        decoded = (vae.decode(latent["samples"].to(vae.device)).sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    assert latent["samples"].shape == (2, 4, 8, 8)
    torch.testing.assert_close(decoded.cpu(), image, rtol=0, atol=1e-6)


def test_diffusers_folder_loads_to_the_same_weights(models, tmp_path):
    """A diffusers-format folder (as `save_pretrained` writes it) loads through LoadBase too."""
    base = impl.load_base(BUILT_IN_TINY)[0]
    folder = models / "checkpoints" / "tiny-diffusers"
    components = base.model.components
    components.unet.save_pretrained(folder / "unet")
    components.vae.save_pretrained(folder / "vae")
    components.text_encoder.save_pretrained(folder / "text_encoder")
    (folder / "model_index.json").write_text((config_dir("tiny-sd15") / "model_index.json").read_text())
    assert "tiny-diffusers" in paths.checkpoint_choices()

    loaded = impl.load_base("tiny-diffusers")[0]
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = (getattr(c, name).state_dict() for c in (components, loaded.model.components))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert torch.equal(run_sampler(loaded)[0], run_sampler(base)[0])


def test_ckpt_checkpoints_load_with_safe_unpickling_only(models, tmp_path):
    from lora_loom.sd15.models import components_state_dict_ldm

    base = impl.load_base(BUILT_IN_TINY)[0]
    state = {k: v.detach().cpu().clone() for k, v in components_state_dict_ldm(base.model.components).items()}
    torch.save({"state_dict": state, "global_step": 1}, models / "checkpoints" / "tiny.ckpt")
    loaded = impl.load_base("tiny.ckpt")[0]
    theirs = loaded.model.components.unet.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in base.model.components.unet.state_dict().items())

    torch.save({"state_dict": state, "callback": print}, models / "checkpoints" / "evil.ckpt")  # code in a pickle
    with pytest.raises(Exception, match=r"evil\.ckpt: not a readable checkpoint"):
        impl.load_base("evil.ckpt")


@pytest.mark.parametrize("save_name", ["../escape", "sub/../../escape", "<absolute>", "link/escape"])
def test_fuse_lora_refuses_save_names_outside_the_checkpoints_folder(models, tmp_path, save_name):
    outside = tmp_path / "outside"
    outside.mkdir()
    save_name = save_name.replace("<absolute>", str(outside / "escape"))
    link = models / "checkpoints" / "link"
    if not link.exists():
        link.symlink_to(outside, target_is_directory=True)  # inside by name, outside for real
    before = sorted(p.name for p in models.rglob("*"))
    base = impl.load_base(BUILT_IN_TINY)[0]
    with pytest.raises(ValueError, match="leaves the checkpoints folder"):
        impl.fuse_lora(base.with_lora(impl.load_lora("style1.safetensors")["result"][0], 1.0, 1.0), save_name)
    assert sorted(p.name for p in models.rglob("*")) == before
    assert list(outside.iterdir()) == [] and not (models.parent / "escape.safetensors").exists()


def test_fusing_over_the_file_a_loaded_base_restores_from_keeps_that_base_exact(models):
    """FuseLoRA saving over the very checkpoint a base was loaded from: the file is replaced by a rename, so the
    loaded base still re-reads the *old* W0 (its open mapping) and restores bit-exactly, with no copies."""
    import shutil

    shutil.copy(built_in_tiny_checkpoint(), models / "checkpoints" / "overwrite-me.safetensors")
    base = impl.load_base("overwrite-me.safetensors")[0]
    components = base.model.components
    original = {k: v.clone() for k, v in components.unet.state_dict().items()}
    style = impl.load_lora("style1.safetensors")["result"][0]
    impl.fuse_lora(base.with_lora(style, 1.0, 1.0), "overwrite-me")  # replaces the file base reads W0 from
    base.activate()  # back to no LoRA: W0 re-read from the (old, still mapped) file
    assert base.model.engine.restore_overhead_bytes == 0
    assert all(torch.equal(v, original[k]) for k, v in components.unet.state_dict().items())
    reloaded = impl.load_base("overwrite-me.safetensors")[0]  # the new file holds the fused weights
    changed = [k for k, v in reloaded.model.components.unet.state_dict().items() if not torch.equal(v, original[k])]
    assert len(changed) == 192  # every LoRA target, nothing else


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "not-sd15"])
def test_load_base_names_the_file_for_corrupt_and_foreign_checkpoints(models, damage):
    from lora_loom.sd15.base import BaseLoadError

    path = models / "checkpoints" / f"{damage}.safetensors"
    whole = built_in_tiny_checkpoint().read_bytes()
    content = {
        "truncated": whole[: len(whole) // 2],
        "garbage": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all",
        "empty": b"",
    }.get(damage)
    if content is None:
        save_file({"lora_unet_x.lora_up.weight": torch.zeros(2, 2)}, str(path))  # a LoRA, not a checkpoint
    else:
        path.write_bytes(content)
    with pytest.raises(BaseLoadError, match=rf"{damage}\.safetensors"):
        impl.load_base(f"{damage}.safetensors")


def test_loaders_run_again_when_their_file_is_replaced_under_the_same_name(models, tmp_path):
    from lora_loom.runner.defaults import default_classes, default_schemas
    from lora_loom.runner.execute import Runner

    classes = default_classes(tmp_path / "out", tmp_path / "temp")
    runner = Runner(default_schemas(classes), classes, progress=False, models_dir=models)
    settings = {**SMALL, "steps": 1, "batch_size": 1, "sampler_name": "euler", "scheduler": "normal"}
    prompt = {
        "1": {"class_type": "LoadBase", "inputs": {"ckpt_name": BUILT_IN_TINY, "dtype": "auto"}},
        "2": {"class_type": "LoadLoRA", "inputs": {"lora_name": "swap.safetensors"}},
        "3": {
            "class_type": "ApplyLoRA",
            "inputs": {"base": ["1", 0], "lora": ["2", 0], "strength_unet": 1.0, "strength_text_encoder": 1.0},
        },  # fmt: skip
        "4": {
            "class_type": "Sampler",
            "inputs": {"base": ["3", 0], "prompt": "x", "negative_prompt": "", "seed": 1, **settings},
        },  # fmt: skip
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
    }
    base = impl.load_base(BUILT_IN_TINY)[0]
    parts = {"unet": base.model.components.unet, "text_encoder": base.model.components.text_encoder}
    lora_file = models / "loras" / "swap.safetensors"
    save_file(random_kohya_lora(parts, kohya_targets("attention"), seed=5, scale=0.3), str(lora_file))
    first = runner.run(prompt)
    assert sorted(first.executed) == ["1", "2", "3", "4", "5"]
    assert runner.run(prompt).executed == []  # nothing changed: all cached
    save_file(random_kohya_lora(parts, kohya_targets("attention"), seed=6, scale=0.3), str(lora_file))
    third = runner.run(prompt)
    assert sorted(third.executed) == ["2", "3", "4", "5"] and third.cached == ["1"]


def test_every_input_has_a_tooltip_in_both_apis():
    from lora_loom.nodes.contract import NODES
    from lora_loom.nodes.schema import v1_input_types

    for schema in NODES:
        assert all(item.tooltip for item in schema.inputs), schema.node_id
        v1 = v1_input_types(schema)
        for section in ("required", "optional"):
            for name, spec in v1.get(section, {}).items():
                assert spec[1].get("tooltip"), (schema.node_id, name)


def test_image_grid_puts_a_batch_per_row_or_per_column():
    """Row layout: batch k is row k. Column layout: batch k is column k (a strength per column, seeds down);
    a shorter batch leaves its cells empty. Labels go left of rows, above columns."""
    import numpy as np

    def batch(value, count):
        return torch.full((count, 8, 8, 3), value)

    a, b = batch(0.2, 3), batch(0.8, 2)
    rows = impl.image_grid(a, "", 1, "batch per row", row_2=b)[0][0].numpy()
    columns = impl.image_grid(a, "", 1, "batch per column", row_2=b)[0][0].numpy()
    gap, tile = 4, 8
    assert rows.shape[:2] == (gap + 2 * (tile + gap), gap + 3 * (tile + gap))
    assert columns.shape[:2] == (gap + 3 * (tile + gap), gap + 2 * (tile + gap))

    def cell(sheet, i, j, top=0):
        y, x = top + gap + i * (tile + gap), gap + j * (tile + gap)
        return sheet[y : y + tile, x : x + tile]

    assert np.allclose(cell(rows, 0, 2), 0.2, atol=1 / 255) and np.allclose(cell(rows, 1, 1), 0.8, atol=1 / 255)
    assert np.allclose(cell(columns, 2, 0), 0.2, atol=1 / 255) and np.allclose(cell(columns, 1, 1), 0.8, atol=1 / 255)
    assert not np.allclose(cell(columns, 2, 1), 0.8, atol=1 / 255)  # column 2 has only two images
    labelled = impl.image_grid(a, "first\nsecond", 1, "batch per column", row_2=b)[0][0].numpy()
    assert labelled.shape[:2] == (16 + columns.shape[0], columns.shape[1])  # labels above, none to the left
