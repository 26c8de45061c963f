import pytest
import torch

from lora_loom.lora_core.sd15_models import build_components

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_fp32():
    """A tiny SD1.5-topology model shared read-only by tests that do not patch it."""
    return build_components("tiny-sd15", seed=0)
