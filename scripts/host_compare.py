"""Our Sampler against the host's KSampler on the same weights (LoomToComfy), and what LoomToComfy costs in RAM.

    python scripts/host_compare.py --comfyui /path/to/ComfyUI [--pairs 24] [--no-doc] [--skip-rss | --rss-only]

Run with the host's Python (the one scripts/host_tests.py uses). For (prompt, seed) pairs of the toy world it
draws each image twice — our `Sampler` (diffusers' schedulers) and ComfyUI's KSampler on LoomToComfy's MODEL,
CLIP and VAE, same prompt, seed, steps, CFG and sampler name — and reports how far apart the two are: the text
conditioning, the pixels, and the scorer's verdicts. Then the resident memory LoomToComfy adds for the
full-size SD1.5 architecture (random weights). Writes its section into docs/comfyui-interop.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## KSampler against our Sampler (scripts/host_compare.py)"
DOC = ROOT / "docs" / "comfyui-interop.md"


def host_image(model, clip, vae, prompt: str, seed: int, *, steps: int, cfg: float, sampler: str, size: int):
    import comfy.sample
    import torch

    def encode(text):
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))

    with torch.inference_mode():  # as the host's executor runs its nodes
        latent = torch.zeros(1, 4, size // 8, size // 8)
        noise = comfy.sample.prepare_noise(latent, seed)
        samples = comfy.sample.sample(
            model, noise, steps, cfg, sampler, "normal", encode(prompt), encode(""), latent, denoise=1.0, seed=seed
        )
        return vae.decode(samples)[0].clamp(0, 1).cpu(), encode(prompt)[0][0].cpu()


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def loom_to_comfy_rss_row() -> str:
    """The table row: resident memory LoomToComfy adds for the full-size SD1.5 architecture (random fp32 weights)."""
    import gc

    import torch

    from lora_loom.lora_core.patcher import PatchEngine
    from lora_loom.nodes.comfy_bridge import loom_to_comfy
    from lora_loom.sd15.base import LoadedModel, SDBase
    from lora_loom.sd15.models import build_components

    gc.collect()
    components = build_components("sd15", seed=0)
    engine = PatchEngine({"unet": components.unet, "text_encoder": components.text_encoder})
    full = SDBase(LoadedModel("sd15-random", components, engine, torch.float32, torch.device("cpu")))
    weights = sum(p.numel() * p.element_size() for _, m in components.items() for p in m.parameters())
    before = rss_bytes()
    handed = loom_to_comfy(full)
    added = rss_bytes() - before
    del handed
    return (
        f"| LoomToComfy on the full-size SD1.5 architecture (fp32): resident memory added / the weights' size | "
        f"{added / 2**30:.2f} GiB / {weights / 2**30:.2f} GiB |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--comfyui", type=Path, required=True)
    parser.add_argument("--pairs", type=int, default=24)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=2.0)
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--rss-only", action="store_true", help="print only the RSS row; the doc is left alone")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(args.comfyui.resolve()))
    import comfy.cli_args
    import numpy as np
    import torch

    comfy.cli_args.args.cpu = not torch.cuda.is_available()
    if args.rss_only:
        print(loom_to_comfy_rss_row())
        return 0
    from lora_loom.nodes.comfy_bridge import loom_to_comfy
    from lora_loom.sd15.base import load_base
    from lora_loom.sd15.builtin import BUILT_IN_TOY
    from lora_loom.sd15.sampling import sample
    from lora_loom.sd15.tokenizer import load_clip_tokenizer
    from lora_loom.toyworld.evaluate import prompt_set
    from lora_loom.toyworld.scorer import score

    base = load_base(BUILT_IN_TOY, dtype="fp32", device="cpu")
    model, clip, vae = loom_to_comfy(base)
    pairs = prompt_set(args.pairs)
    tokenizer = load_clip_tokenizer()
    text_gaps, pixel_gaps, agree, ours_right, theirs_right = [], [], 0, 0, 0
    for i, (prompt, scene) in enumerate(zip(pairs.prompts, pairs.truth, strict=True)):
        settings = dict(steps=args.steps, cfg=args.cfg, sampler_name=args.sampler, width=64, height=64)
        seed = pairs.seeds[i]
        ours = sample(base, prompt, seed=seed, **settings).images[0]
        theirs, host_context = host_image(
            model, clip, vae, prompt, seed, steps=args.steps, cfg=args.cfg, sampler=args.sampler, size=64
        )
        with torch.no_grad():
            ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
            context = base.model.components.text_encoder(ids.input_ids)[0]
        text_gaps.append(float((context - host_context).abs().max()))
        pixel_gaps.append(float((ours - theirs).abs().mean() * 255))
        verdicts = [score((img.numpy() * 255).round().astype(np.uint8), scene) for img in (ours, theirs)]
        right = [all(v[a] for a in ("background", "colour", "shape", "position")) for v in verdicts]
        agree += verdicts[0] == verdicts[1]
        ours_right, theirs_right = ours_right + right[0], theirs_right + right[1]
        print(f"pair {i}: text max |Δ| {text_gaps[-1]:.2e}, pixels mean |Δ| {pixel_gaps[-1]:.3f}/255", flush=True)
    n = len(pixel_gaps)
    lines = [
        HEADING,
        "",
        f"Built-in toy-world base, fp32, CPU; {n} (prompt, seed) pairs of held-back scenes; `{args.sampler}`, "
        f"scheduler `normal`, {args.steps} steps, CFG {args.cfg:g}, 64×64. Ours: the `Sampler` node (diffusers' "
        "scheduler). Theirs: ComfyUI's own `CLIPTextEncode` / KSampler (`comfy.sample.sample`, noise from "
        "`prepare_noise(seed)`) / `VAEDecode` on LoomToComfy's MODEL, CLIP and VAE. The weights are the same "
        "tensors' values (tests/test_comfy_host.py); what differs is the samplers' arithmetic (ComfyUI's k-diffusion "
        "sigmas and steps against diffusers' timesteps) and the text path's kernels.",
        "",
        "| | value |",
        "|---|---|",
        f"| text conditioning, largest |Δ| over all pairs (output scale ~1) | {max(text_gaps):.2e} |",
        f"| pixels, mean |Δ| per image (0–255): median / max | {np.median(pixel_gaps):.3f} / {max(pixel_gaps):.3f} |",
        f"| scorer verdicts identical (all five attributes) | {agree} of {n} |",
        f"| background, colour, shape, position all right: ours / KSampler | {ours_right} / {theirs_right} of {n} |",
    ]
    if not args.skip_rss:
        del base, model, clip, vae
        lines.append(loom_to_comfy_rss_row())
    section = "\n".join(lines) + "\n"
    print(section)
    if not args.no_doc:
        text = DOC.read_text() if DOC.is_file() else "# LoRA Loom with ComfyUI's own nodes\n\n"
        start = text.find(HEADING)
        if start >= 0:
            end = text.find("\n## ", start + len(HEADING))
            text = text[:start] + section + (text[end + 1 :] if end >= 0 else "")
        else:
            text = text.rstrip("\n") + "\n\n" + section
        DOC.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
