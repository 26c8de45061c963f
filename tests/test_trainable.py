"""A trainable LoRA is a separate, mutable form; freezing it gives a new LoRA the engine re-patches correctly."""

import math

import torch

from lora_loom.lora_core.patcher import PatchEngine, PatchEntry
from lora_loom.lora_core.targets import kohya_targets
from lora_loom.lora_core.trainable import TrainableLoRA

from util import assert_bitwise_equal, fresh_tiny, make_lora, state_of


def engine_for(model):
    return PatchEngine({"unet": model.unet, "text_encoder": model.text_encoder})


def test_editing_a_trainable_lora_and_freezing_it_again_repatches_correctly():
    model = fresh_tiny()
    original = state_of(model)
    first = make_lora(model, seed=1, scope="attention")
    first_factors = [adapter.up.clone() for adapter in first.adapters.values()]
    engine = engine_for(model)
    engine.apply([PatchEntry(first, 1.0, 1.0)])
    patched_with_first = state_of(model)

    trainable = TrainableLoRA.from_lora(first)
    with torch.no_grad():
        for _, adapter in trainable.items():
            adapter.up.mul_(2.0)  # a "training step"
    second = trainable.freeze()
    assert second.fingerprint != first.fingerprint
    assert all(torch.equal(a.up, b) for a, b in zip(first.adapters.values(), first_factors, strict=True))  # untouched

    stats = engine.apply([PatchEntry(second, 1.0, 1.0)])
    assert stats.weights_written == len(second.adapters)  # every weight re-computed, none served stale
    fresh = fresh_tiny()
    engine_for(fresh).apply([PatchEntry(second, 1.0, 1.0)])
    assert_bitwise_equal(model, state_of(fresh))

    engine.apply([PatchEntry(first, 1.0, 1.0)])  # the first LoRA still patches what it patched before
    assert_bitwise_equal(model, patched_with_first)
    engine.restore()
    assert_bitwise_equal(model, original)


def test_fresh_factors_start_as_kohya_does_and_leave_the_model_unchanged():
    model = fresh_tiny()
    parts = {"unet": model.unet, "text_encoder": model.text_encoder}
    targets = kohya_targets("all")
    trainable = TrainableLoRA.initialized(parts, targets, rank=4, alpha=2.0, seed=0)
    again = TrainableLoRA.initialized(parts, targets, rank=4, alpha=2.0, seed=0)
    assert [t for t, _ in trainable.items()] == sorted(targets)
    for (_, adapter), (_, same) in zip(trainable.items(), again.items(), strict=True):
        assert torch.equal(adapter.down, same.down)  # seeded
        assert not adapter.up.any() and adapter.up.requires_grad and adapter.down.dtype == torch.float32
        fan_in = adapter.down[0].numel()
        assert adapter.down.abs().max() <= 1 / math.sqrt(fan_in)  # nn.Linear's Kaiming-uniform bound
        assert adapter.scale == 0.5
    proj_in = dict(trainable.items())["unet.down_blocks.0.attentions.0.proj_in"]
    assert proj_in.down.ndim == 4 and proj_in.up.shape[2:] == (1, 1)  # SD1.5's proj_in is a 1x1 conv
    original = state_of(model)
    engine_for(model).apply([PatchEntry(trainable.freeze("zero"), 1.0, 1.0)])
    assert_bitwise_equal(model, original)  # up = 0: W0 + 0, rounded once, is W0


def test_gradients_reach_the_factors():
    model = fresh_tiny()
    parts = {"unet": model.unet, "text_encoder": model.text_encoder}
    target = "text_encoder.text_model.encoder.layers.0.mlp.fc1"
    trainable = TrainableLoRA.initialized(parts, [target], rank=2, alpha=2.0, seed=1)
    adapter = dict(trainable.items())[target]
    x = torch.randn(3, adapter.down.shape[1])
    loss = (x @ (adapter.scale * adapter.up @ adapter.down).T).sum() + (x @ adapter.down.T).pow(2).sum()
    loss.backward()
    assert adapter.up.grad is not None and adapter.up.grad.abs().sum() > 0
    assert len(list(trainable.parameters())) == 2
