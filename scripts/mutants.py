"""Break the code on purpose, in ways the README and docs rule out, and check that the test suite notices.

    python scripts/mutants.py              # every mutant, each against the tests that should catch it
    python scripts/mutants.py --full       # each mutant against the whole suite (slow: one suite run each)
    python scripts/mutants.py -k karras    # only mutants whose name contains "karras"

The working tree is copied once to a temporary folder (tracked and untracked, not ignored files); each mutant
edits one file there, runs pytest with that copy first on the import path, and restores the file. The repo
itself is never modified. Exit status 1 if any mutant survives (its tests all pass).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # file in the repo
    old: str  # exact text, found exactly once
    new: str
    tests: tuple[str, ...]  # what should catch it (pytest node ids or files)


MUTANTS = (
    Mutant(
        "the engine writes into weights it shares with a host model (no copy-on-write)",
        "lora_core/patcher.py",
        '        if getattr(weight, "lora_loom_shared", False):',
        "        if False:",
        ("tests/test_patcher.py",),
    ),
    Mutant(
        "the inspector route follows links out of the loras folders",
        "nodes/web_routes.py",
        "    if not any(real.is_relative_to(root) for root in roots):",
        "    if False:",
        ("tests/test_web_routes.py",),
    ),
    Mutant(
        "the inspector route checks only the name as sent, not its URL-decoded forms",
        "nodes/web_routes.py",
        "    for _ in range(2):\n        found.append(unquote(found[-1]))",
        "    pass",
        ("tests/test_web_routes.py",),
    ),
    Mutant(
        "the inspector reads a kohya alpha as the rank",
        "lora_core/inspect.py",
        '                module["alpha"] = _read_scalar(f, data_start, entry)',
        '                module["alpha"] = None',
        ("tests/test_inspect.py",),
    ),
    Mutant(
        "a sampler name mapped to another (lms → euler)",
        "sd15/sampling.py",
        '"lms": diffusers.LMSDiscreteScheduler,',
        '"lms": diffusers.EulerDiscreteScheduler,',
        ("tests/test_sampler_reference.py",),
    ),
    Mutant(
        "karras dropped",
        "sd15/sampling.py",
        'options["use_karras_sigmas"] = True',
        "pass",
        ("tests/test_sampler_reference.py",),
    ),
    Mutant(
        "half-precision weights left unpatched",
        "lora_core/delta.py",
        "        if accumulator is not out:\n            out.copy_(accumulator)",
        "        if accumulator is not out:\n            out.copy_(w0)",
        ("tests/test_patch_formula.py",),
    ),
    Mutant(
        "half-precision delta rounded before the sum (two roundings)",
        "lora_core/delta.py",
        "        if up is not None:\n            rows.addmm_(up, down)",
        "        if up is not None:\n            rows.add_((up @ down).to(out.dtype).float())",
        ("tests/test_patch_formula.py",),
    ),
    Mutant(
        "LoRA scale alpha/rank ignored",
        "lora_core/adapters/lora.py",
        "self.scale = self.alpha / denominator",
        "self.scale = 1.0",
        ("tests/test_patch_formula.py", "tests/test_reference_diffusers.py", "tests/test_comfyui_files.py"),
    ),
    Mutant(
        "Tucker core transposed",
        "lora_core/adapters/lora.py",
        'torch.einsum("abhw,bi->aihw", mid, down.flatten(1))',
        'torch.einsum("bahw,bi->aihw", mid, down.flatten(1))',
        ("tests/test_patcher.py",),
    ),
    Mutant(
        "FuseLoRA save path allowed out of its folder",
        "nodes/paths.py",
        "if root.resolve() not in path.parents:",
        "if False:",
        ("tests/test_nodes.py",),
    ),
    Mutant(
        "SaveImage checks the prefix as text (symlinks lead out)",
        "runner/core_nodes.py",
        "if os.path.commonpath((real_output, os.path.realpath(folder)))",
        "if os.path.commonpath((output_dir, folder))",
        ("tests/test_runner.py",),
    ),
    Mutant(
        "scorer misreads position (left and right swapped)",
        "toyworld/scorer.py",
        'column = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "centre"',
        'column = "right" if cx < 1 / 3 else "left" if cx > 2 / 3 else "centre"',
        ("tests/test_toyworld.py",),
    ),
    Mutant(
        "seed's control_after_generate value not skipped in UI workflows",
        "runner/workflow.py",
        "def control_values(item: Input) -> int:",
        "def control_values(item: Input) -> int:\n    return 0",
        ("tests/test_frontend_workflows.py",),
    ),
    Mutant(
        "LyCORIS module names forgotten",
        "lora_core/targets.py",
        '"lycoris_" + name.replace(".", "_"),',
        "",
        ("tests/test_comfyui_files.py",),
    ),
    Mutant(
        "restore re-reads W0 from the live (patched) weight",
        "lora_core/patcher.py",
        "            return self.source.read(component, name, weight)",
        "            return weight.detach().clone()",
        ("tests/test_file_backed_restore.py",),
    ),
    Mutant(
        "writer stores rsLoRA's alpha as is (kohya readers would get alpha/r, not alpha/sqrt(r))",
        "lora_core/writer.py",
        "return adapter.scale * adapter.rank",
        "return adapter.alpha",
        ("tests/test_writer.py",),
    ),
    Mutant(
        "writer names the text encoder without text_model. (what A1111 and ComfyUI do not map)",
        "lora_core/targets.py",
        'return prefix + path.replace(".", "_")',
        'return prefix + path.removeprefix("text_model.").replace(".", "_")',
        ("tests/test_writer.py", "tests/test_comfyui_files.py"),
    ),
    Mutant(
        "min-SNR weight divided by SNR for v-prediction too (diffusers divides by SNR + 1)",
        "sd15/objective.py",
        'return clamped / (snr + 1) if self.prediction_type == "v_prediction" else clamped / snr',
        "return clamped / snr",
        ("tests/test_objective.py",),
    ),
    Mutant(
        "installs bypass the lock (README test command without -c requirements.lock)",
        "README.md",
        'pip install -q torch==2.13.0 -c requirements.lock -e ".[test]"',
        'pip install -q torch==2.13.0 -e ".[test]"',
        ("tests/test_install.py",),
    ),
    Mutant(
        "trained LoRA scaled by alpha/rank·1.01 in the forward pass",
        "lora_core/injection.py",
        "return F.linear(F.linear(x, adapter.down), adapter.up) * adapter.scale",
        "return F.linear(F.linear(x, adapter.down), adapter.up) * adapter.scale * 1.01",
        ("tests/test_train_reference.py",),
    ),
    Mutant(
        "min-SNR weighting divided by SNR + 1 for epsilon",
        "sd15/objective.py",
        'return clamped / (snr + 1) if self.prediction_type == "v_prediction" else clamped / snr',
        "return clamped / (snr + 1)",
        ("tests/test_train_reference.py",),
    ),
    Mutant(
        "optimizer state not resumed",
        "lora_core/training_loop.py",
        "    for key, part in parts.items():\n        part.load_state_dict(saved[key])",
        "    for key, part in parts.items():\n        if key != 'optimizer':\n"
        "            part.load_state_dict(saved[key])",
        ("tests/test_trainer.py::test_an_interrupted_run_resumes_to_the_uninterrupted_file",),
    ),
    Mutant(
        "the trained file's hooks left on the shared model",
        "lora_core/injection.py",
        "        for handle in handles:\n            handle.remove()",
        "        pass",
        ("tests/test_trainer.py::test_training_leaves_the_shared_model_bitwise_and_builds_on_the_applied_lora",),
    ),
    Mutant(
        "safetensors metadata in the library's (random) order",
        "lora_core/writer.py",
        "    payload = canonical_header(save(tensors, metadata=full))",
        "    payload = save(tensors, metadata=full)",
        ("tests/test_trainer.py::test_same_inputs_give_a_bitwise_identical_file",),
    ),
    Mutant(
        "the heap bound never trims",
        "training/heap.py",
        "        if rss > self.floor + self.slack:",
        "        if False:",
        (
            "tests/test_train_heap.py::test_training_heap_keeps_large_temporaries_bounds_the_free_space_and_restores_glibc",
        ),
    ),
    Mutant(
        "gradient checkpointing recomputes every U-Net level",
        "training/trainer.py",
        "CHECKPOINTED_LEVELS = 2",
        "CHECKPOINTED_LEVELS = 4",
        ("tests/test_train_heap.py::test_checkpointing_recomputes_the_first_levels_only_and_trains_the_same",),
    ),
)


def copy_tree(destination: Path) -> None:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for name in filter(None, (item.decode() for item in listed)):
        source = ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def run_tests(copy: Path, tests: tuple[str, ...]) -> tuple[bool, list[str]]:
    """(all passed, failing test ids) with the copy imported as `lora_loom`."""
    environment = {**os.environ, "PYTHONPATH": str(copy.parent), "LORA_LOOM_UNLOCKED": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", "--maxfail=3", *tests]
    result = subprocess.run(command, cwd=copy, env=environment, capture_output=True, text=True)
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", result.stdout, flags=re.M)
    return result.returncode == 0, failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="run the whole suite for each mutant")
    parser.add_argument("-k", dest="pattern", default="", help="only mutants whose name contains this")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if args.pattern.lower() in m.name.lower()]

    survivors = []
    with tempfile.TemporaryDirectory(prefix="lora-loom-mutants-") as scratch:
        copy = Path(scratch) / "lora_loom"  # the repo root is the package
        copy_tree(copy)
        passed, failed = run_tests(copy, ("tests/test_install.py",))
        if not passed:
            print(f"the unmutated copy already fails: {failed}")
            return 2
        for mutant in chosen:
            path = copy / mutant.path
            original = path.read_text()
            if original.count(mutant.old) != 1:
                print(f"STALE   {mutant.name}: the text to replace is not in {mutant.path} exactly once")
                survivors.append(mutant.name)
                continue
            path.write_text(original.replace(mutant.old, mutant.new))
            try:
                passed, failed = run_tests(copy, () if args.full else mutant.tests)
            finally:
                path.write_text(original)
            if passed:
                survivors.append(mutant.name)
                print(f"SURVIVED {mutant.name}")
            else:
                print(f"killed   {mutant.name}: {', '.join(failed) or 'pytest failed'}", flush=True)
    print(f"\n{len(chosen) - len(survivors)} of {len(chosen)} mutants killed")
    return 1 if survivors else 0


if __name__ == "__main__":
    raise SystemExit(main())
