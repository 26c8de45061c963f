"""The trainer's promises: deterministic, resumable bitwise, reuses a finished run, leaves the base as it was,
writes a kohya file every reader agrees on, stops cleanly on NaN."""

import hashlib
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_loom.lora_core.injection import lora_in_forward
from lora_loom.lora_core.trainable import TrainableLoRA
from lora_loom.sd15.base import load_base
from lora_loom.sd15.objective import DiffusionObjective
from lora_loom.sd15.sampling import sample_pairs
from lora_loom.training.dataset import load_pixels, scan_dataset
from lora_loom.training.settings import SettingsError, TrainSettings
from lora_loom.training.trainer import TrainingError, TrainingInterrupted, state_path_for, train_lora

from util import make_lora, state_of, write_dataset

SMALL = dict(rank=4, alpha=4.0, steps=12, learning_rate=1e-3, resolution=64, batch_size=2, seed=1)


@pytest.fixture(scope="module")
def tiny_base():
    return load_base("tiny-sd15 (built-in)")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = write_dataset(tmp_path_factory.mktemp("data") / "set", n=4)
    return scan_dataset(folder, resolution=64)


def file_bytes(path):
    return path.read_bytes()


def test_same_inputs_give_a_bitwise_identical_file(tiny_base, data, tmp_path):
    settings = TrainSettings(**SMALL, train_text_encoder=True)
    first = train_lora(tiny_base, data, settings, tmp_path / "a" / "lora.safetensors")
    second = train_lora(tiny_base, data, settings, tmp_path / "b" / "lora.safetensors")
    assert file_bytes(first.path) == file_bytes(second.path)
    other = train_lora(tiny_base, data, TrainSettings(**{**SMALL, "seed": 2}), tmp_path / "c" / "lora.safetensors")
    assert load_file(other.path) != load_file(first.path)


@pytest.mark.parametrize("how", ["signal-style stop", "host cancel from the progress callback"])
def test_an_interrupted_run_resumes_to_the_uninterrupted_file(tiny_base, data, tmp_path, how):
    settings = TrainSettings(**SMALL, train_text_encoder=True, lr_scheduler="cosine", warmup_steps=3)
    whole = train_lora(tiny_base, data, settings, tmp_path / "whole" / "lora.safetensors")

    output = tmp_path / "parts" / "lora.safetensors"
    if how == "signal-style stop":
        with pytest.raises(TrainingInterrupted, match=r"interrupted at step 5/12; run the same workflow again"):
            train_lora(tiny_base, data, settings, output, stop_after=5)
    else:

        class Cancelled(Exception):
            pass

        def cancel_at_7(info):
            if info.step == 7:
                raise Cancelled

        with pytest.raises(Cancelled):
            train_lora(tiny_base, data, settings, output, progress=cancel_at_7)
    assert state_path_for(output).is_file() and not output.exists()
    resumed = train_lora(tiny_base, data, settings, output)
    assert resumed.resumed_from in (5, 7)
    assert any("resumed from step" in note for note in resumed.notes)
    assert file_bytes(resumed.path) == file_bytes(whole.path)
    assert resumed.losses == whole.losses  # the history survives the interruption too


def test_a_finished_identical_run_is_returned_not_retrained(tiny_base, data, tmp_path):
    settings = TrainSettings(**SMALL)
    output = tmp_path / "lora.safetensors"
    first = train_lora(tiny_base, data, settings, output)
    first_bytes = file_bytes(output)
    steps_run = []
    again = train_lora(tiny_base, data, settings, output, progress=lambda info: steps_run.append(info.step))
    assert again.reused and not steps_run
    assert again.losses == first.losses and file_bytes(output) == first_bytes
    changed = train_lora(tiny_base, data, TrainSettings(**{**SMALL, "rank": 2}), output)
    assert not changed.reused and any("different inputs" in note for note in changed.notes)
    output.write_bytes(first_bytes)  # a user puts another file under the name: trained again
    replaced = train_lora(tiny_base, data, TrainSettings(**{**SMALL, "rank": 2}), output)
    assert not replaced.reused


def test_a_second_run_over_the_same_data_encodes_nothing(tiny_base, data, tmp_path):
    settings = TrainSettings(**{**SMALL, "steps": 1})
    train_lora(tiny_base, data, settings, tmp_path / "one.safetensors")
    again = train_lora(tiny_base, data, TrainSettings(**{**SMALL, "steps": 2}), tmp_path / "two.safetensors")
    assert "latents 0 encoded, 4 from the cache; captions 0 encoded" in "\n".join(again.notes)


def test_training_leaves_the_shared_model_bitwise_and_builds_on_the_applied_lora(tiny_base, data, tmp_path):
    applied = tiny_base.with_lora(make_lora(tiny_base.model.components, seed=3, scope="attention"), 0.8, 0.6)
    applied.activate()
    before = state_of(tiny_base.model.components)
    modes = [m.training for _, m in tiny_base.model.components.items()]
    settings = TrainSettings(**SMALL, train_text_encoder=True, gradient_checkpointing=True)
    on_lora = train_lora(applied, data, settings, tmp_path / "on_lora.safetensors")
    after = state_of(tiny_base.model.components)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for _, m in tiny_base.model.components.items()] == modes
    assert not any(p.requires_grad for _, m in tiny_base.model.components.items() for p in m.parameters())
    modules = [m for _, component in tiny_base.model.components.items() for m in component.modules()]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in modules)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in modules)
    plain = train_lora(tiny_base, data, settings, tmp_path / "plain.safetensors")
    assert plain.losses[0] != on_lora.losses[0]  # the applied LoRA was part of the model trained on


def test_gradient_checkpointing_and_bf16_train_the_same_lora_closely(tiny_base, data, tmp_path):
    settings = TrainSettings(**SMALL, train_text_encoder=True)
    plain = train_lora(tiny_base, data, settings, tmp_path / "plain.safetensors")
    checkpointed = train_lora(
        tiny_base, data, TrainSettings(**SMALL, train_text_encoder=True, gradient_checkpointing=True),
        tmp_path / "checkpointed.safetensors",
    )  # fmt: skip
    torch.testing.assert_close(torch.tensor(checkpointed.losses), torch.tensor(plain.losses), rtol=1e-5, atol=0)
    bf16 = train_lora(tiny_base, data, TrainSettings(**SMALL, mixed_precision="bf16"), tmp_path / "bf16.safetensors")
    assert all(math.isfinite(v) for v in bf16.losses)
    fp16 = train_lora(tiny_base, data, TrainSettings(**SMALL, mixed_precision="fp16"), tmp_path / "fp16.safetensors")
    assert all(math.isfinite(v) for v in fp16.losses)


def test_the_file_is_kohyas_with_full_metadata(tiny_base, data, tmp_path):
    settings = TrainSettings(**SMALL, train_text_encoder=True, save_every_n_steps=4)
    data = scan_dataset(data.root, resolution=64, caption_prefix="sks")
    result = train_lora(tiny_base, data, settings, tmp_path / "my-lora.safetensors")
    with safe_open(str(result.path), "pt") as f:
        metadata, keys = f.metadata(), list(f.keys())
        alpha = f.get_tensor("lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha")
    assert alpha.dtype == torch.float32 and alpha.dim() == 0 and alpha.item() == 4.0
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.") for k in keys)
    assert {k.rsplit(".", 2)[-2] for k in keys if k.endswith(".weight")} == {"lora_up", "lora_down"}
    expected = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": "4",
        "ss_network_alpha": "4",
        "ss_base_model_version": "sd_v1",
        "ss_resolution": "(64, 64)",
        "ss_steps": "12",
        "ss_learning_rate": "0.001",
        "ss_unet_lr": "0.001",
        "ss_text_encoder_lr": "5e-05",
        "ss_num_train_images": "4",
        "ss_seed": "1",
        "ss_output_name": "my-lora",
        "ss_optimizer": "torch.optim.adamw.AdamW(weight_decay=0.01)",
        "ss_lr_scheduler": "constant",
        "ss_min_snr_gamma": "5.0",
        "ss_noise_offset": "None",
        "ss_mixed_precision": "no",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.trigger_phrase": "sks",
    }
    assert {k: metadata.get(k) for k in expected} == expected
    tags = json.loads(metadata["ss_tag_frequency"])
    assert tags["set"]["sks"] == 4 and all(isinstance(n, int) for n in tags["set"].values())
    data_bytes = result.path.read_bytes()
    header = int.from_bytes(data_bytes[:8], "little")
    assert metadata["sshs_model_hash"] == hashlib.sha256(data_bytes[8 + header :]).hexdigest()
    intermediates = sorted(p.name for p in tmp_path.glob("my-lora-step*.safetensors"))
    assert intermediates == ["my-lora-step00000004.safetensors", "my-lora-step00000008.safetensors"]
    with safe_open(str(tmp_path / intermediates[0]), "pt") as f:
        assert f.metadata()["ss_steps"] == "4"


def test_rslora_is_written_as_the_equivalent_kohya_alpha(tiny_base, data, tmp_path):
    settings = TrainSettings(**{**SMALL, "alpha": 8.0}, use_rslora=True)
    result = train_lora(tiny_base, data, settings, tmp_path / "rs.safetensors")
    adapter = next(iter(result.lora.adapters.values()))
    assert adapter.scale == pytest.approx(8.0 / math.sqrt(4))
    with safe_open(str(result.path), "pt") as f:
        assert f.metadata()["ss_network_alpha"] == "16"  # α·√r: every kohya reader gets α/√r


def test_the_injected_forward_equals_the_file_as_diffusers_and_our_engine_apply_it(tiny_base, data, tmp_path):
    """The model trained (hooks) = the file fused by diffusers' `load_lora_weights` = our engine's patch."""
    from test_reference_diffusers import diffusers_fused, relative_error

    settings = TrainSettings(**{**SMALL, "target": "kohya"}, train_text_encoder=True)
    result = train_lora(tiny_base, data, settings, tmp_path / "k.safetensors")
    reference = diffusers_fused(load_file(result.path), 1.0, 1.0)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(49000, (1, 77), generator=generator)
    latents = torch.randn(1, 4, 8, 8, generator=generator)

    def outputs(components):
        with torch.no_grad():
            context = components.text_encoder(ids)[0]
            return context, components.unet(latents, 500, encoder_hidden_states=context).sample

    components = tiny_base.model.components
    parts = {"unet": components.unet, "text_encoder": components.text_encoder}
    tiny_base.activate()
    with lora_in_forward(parts, TrainableLoRA.from_lora(result.lora)):
        trained = outputs(components)
    tiny_base.with_lora(result.lora, 1.0, 1.0).activate()
    patched = outputs(components)
    tiny_base.activate()
    theirs = outputs(reference)
    for mine, engine, diffusers in zip(trained, patched, theirs, strict=True):
        assert relative_error(mine, diffusers) <= 1e-5
        assert relative_error(engine, diffusers) <= 1e-5
    assert relative_error(trained[1], outputs(components)[1]) > 1e-4  # the LoRA does change the output


def test_a_nan_loss_stops_with_the_step_and_keeps_the_last_good_state(tiny_base, data, tmp_path, monkeypatch):
    real_loss, calls = DiffusionObjective.loss, []

    def loss(self, *args):
        calls.append(1)
        value = real_loss(self, *args)
        return value * float("nan") if len(calls) == 3 else value

    monkeypatch.setattr(DiffusionObjective, "loss", loss)
    before = state_of(tiny_base.model.components)
    with pytest.raises(TrainingError, match=r"loss became nan at step 3/12.*learning_rate"):
        train_lora(tiny_base, data, TrainSettings(**SMALL), tmp_path / "nan.safetensors")
    after = state_of(tiny_base.model.components)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not (tmp_path / "nan.safetensors").exists()


def test_adamw8bit_without_bitsandbytes_is_a_clear_error(tiny_base, data, tmp_path):
    pytest.importorskip("torch")  # keeps the signature uniform
    try:
        import bitsandbytes  # noqa: F401

        pytest.skip("bitsandbytes is installed here")
    except ImportError:
        pass
    with pytest.raises(TrainingError, match="AdamW8bit needs the bitsandbytes package"):
        train_lora(tiny_base, data, TrainSettings(**SMALL, optimizer="AdamW8bit"), tmp_path / "x.safetensors")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rank": 0}, "rank must be 1…256"),
        ({"resolution": 100}, "multiple of 64"),
        ({"target": "everything"}, "target must be one of attention, kohya"),
        ({"mixed_precision": "fp8"}, "mixed_precision must be one of"),
    ],
)
def test_settings_out_of_range_name_the_setting(change, message):
    with pytest.raises(SettingsError, match=message):
        TrainSettings(**{**SMALL, **change})


def test_on_the_toy_world_the_loss_falls_and_samples_move_toward_the_training_images(tmp_path):
    """A held-out concept (the shape `star`): with the trained LoRA at strength 1, samples for the training
    captions come measurably closer to the training images than at strength 0."""
    from lora_loom.toyworld.datasets import built_in_dataset

    base = load_base("toy-world-sd15 (built-in)")
    data = scan_dataset(built_in_dataset("toy-star (built-in)"), resolution=64)
    settings = TrainSettings(rank=8, alpha=8.0, steps=150, learning_rate=2e-3, resolution=64, batch_size=2)
    result = train_lora(base, data, settings, tmp_path / "star.safetensors")
    first, last = sum(result.losses[:30]) / 30, sum(result.losses[-30:]) / 30
    assert last < first
    prompts, seeds = [item.caption for item in data.items], list(range(len(data.items)))
    truth = torch.stack([(load_pixels(item) + 1) / 2 for item in data.items]).permute(0, 2, 3, 1)

    def distance(handle):
        images = sample_pairs(handle, prompts, seeds, cfg=2.0, width=64, height=64, steps=12).images
        return ((images - truth) ** 2).mean().item()

    without, with_lora = distance(base), distance(base.with_lora(result.lora, 1.0, 1.0))
    assert with_lora < 0.75 * without, (without, with_lora)
