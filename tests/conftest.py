import pytest
import torch

from lora_loom.sd15.models import build_components

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Every cache (built-in tiny checkpoint, derived tokenizer files, converted .ckpt files) in a fresh temp
    folder: a stale file in ~/.cache/lora_loom can neither hide a regression nor be written by the tests."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORA_LOOM_CACHE", str(folder / "lora_loom"))
        patch.setenv("XDG_CACHE_HOME", str(folder))
        yield folder


@pytest.fixture(autouse=True)
def restore_models_dir():
    """Tests and the CLI set the headless models folder (a module global); put it back after each test."""
    from lora_loom.nodes import paths

    saved = paths._models_dir
    yield
    paths.set_models_dir(saved)


@pytest.fixture(scope="session")
def tiny_fp32():
    """A tiny SD1.5-topology model shared read-only by tests that do not patch it."""
    return build_components("tiny-sd15", seed=0)
