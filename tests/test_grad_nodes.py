"""Nodes that train run with autograd: the runner and the host class step out of inference mode for them."""

import torch

from lora_loom.lora_core.trainable import TrainableLoRA
from lora_loom.nodes.registry import v1_class
from lora_loom.nodes.schema import Input, NodeSchema, Output
from lora_loom.runner.defaults import default_classes, default_schemas
from lora_loom.runner.execute import Runner
from lora_loom.sd15.builtin import BUILT_IN_TINY

TARGET = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"
PROBE = NodeSchema(
    "GradProbe",
    "Grad probe",
    "test",
    "",
    (Input("base", "SD_BASE"),),
    (Output("STRING", "report"),),
    output_node=True,
    needs_grad=True,
)


def one_backward_step(base) -> dict:
    """What a training node does: a LoRA on one U-Net module, a forward through the frozen base, a backward."""
    unet = base.model.components.unet
    lora = TrainableLoRA.initialized({"unet": unet}, [TARGET], rank=2, alpha=2.0, seed=0)
    adapter = dict(lora.items())[TARGET]
    torch.nn.init.normal_(adapter.up)  # non-zero, so both factors get gradients
    module = unet.get_submodule(TARGET.removeprefix("unet."))
    hook = module.register_forward_hook(
        lambda _m, args, out: out + adapter.scale * args[0] @ (adapter.up @ adapter.down).T
    )
    try:
        g = torch.Generator().manual_seed(0)
        latents = torch.randn(1, 4, 8, 8, generator=g)
        context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
        loss = unet(latents, 500, encoder_hidden_states=context).sample.pow(2).mean()
        loss.backward()
    finally:
        hook.remove()
    return {
        "inference_mode": torch.is_inference_mode_enabled(),
        "up_grad": float(adapter.up.grad.abs().sum()),
        "down_grad": float(adapter.down.grad.abs().sum()),
        "base_has_grads": any(p.grad is not None for p in unet.parameters()),
    }


def test_a_graph_loadbase_into_a_training_node_runs_with_gradients(tmp_path):
    reports = []

    def probe(base):
        reports.append(one_backward_step(base))
        return {"ui": {"text": ["ok"]}, "result": ("ok",)}

    classes = {**default_classes(tmp_path / "out", tmp_path / "temp"), "GradProbe": v1_class(PROBE, probe)}
    schemas = {**default_schemas(classes), "GradProbe": PROBE}
    prompt = {
        "1": {"class_type": "LoadBase", "inputs": {"ckpt_name": BUILT_IN_TINY, "dtype": "fp32"}},
        "2": {"class_type": "GradProbe", "inputs": {"base": ["1", 0]}},
    }
    result = Runner(schemas, classes, progress=False).run(prompt)
    assert result.executed == ["1", "2"]
    (report,) = reports
    assert report["inference_mode"] is False
    assert report["up_grad"] > 0 and report["down_grad"] > 0
    assert not report["base_has_grads"]  # the base stays frozen


def test_the_host_class_of_a_training_node_leaves_the_hosts_inference_mode():
    seen = []
    cls = v1_class(PROBE, lambda base: seen.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled())))
    plain = v1_class(
        NodeSchema("Plain", "Plain", "test", "", ()), lambda: seen.append(torch.is_inference_mode_enabled())
    )
    with torch.inference_mode():  # what ComfyUI's executor does around every node
        cls().execute(base=None)
        plain().execute()
    assert seen == [(False, True), True]
