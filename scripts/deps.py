"""The project's pinned dependency set (`requirements.lock`) and the drift against the newest releases.

    python scripts/deps.py drift             # newest versions pyproject's ranges allow: run the suite, diff vs the lock
    python scripts/deps.py lock [--with S]   # re-resolve to the newest versions (+ extra caps S), run the suite,
                                             # and rewrite requirements.lock only if the suite passed there

Each command builds a fresh venv in a temporary folder (or --venv DIR, kept), installs the project into it
the way the README's test command does but *without* the lock, and runs the README's checks there (ruff
check, ruff format --check, pytest). The repository's own `.venv` is never touched.

The lock is a pip constraints file: every direct and transitive dependency at the version the suite last
passed with, except torch, which the README's install line pins itself (`torch==2.13.0` is the local CPU
wheel on CPU machines and PyPI's CUDA build on a GPU machine; a `+cpu` pin would break GPU users).
Refreshing: `python scripts/deps.py lock`, read the diff, commit `requirements.lock` with the suite result.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
# The README's torch pin: kept out of the lock (see the module docstring).
TORCH = "torch==2.13.0"
NOT_LOCKED = {"torch", "lora-loom", "pip", "setuptools", "wheel"}
CHECKS = (
    ["ruff", "check", "."],
    ["ruff", "format", "--check", "."],
    ["python", "-m", "pytest", "-p", "no:cacheprovider", "-rs"],
)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_pins(text: str) -> dict[str, str]:
    """`name==version` lines (comments, editables and blank lines skipped) → {canonical name: version}."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line and not line.startswith("-"):
            name, version = line.split("==", 1)
            pins[canonical(name)] = version.strip()
    return pins


def make_env(venv: Path, extra: list[str]) -> dict[str, str]:
    """A fresh venv with the project (+ test extra) at the newest versions allowed; returns its freeze."""
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    subprocess.run([*pip, "install", "-q", TORCH, "-e", f"{ROOT}[test]", *extra], check=True)
    freeze = subprocess.run([*pip, "freeze", "--exclude-editable"], check=True, capture_output=True, text=True)
    return {name: version for name, version in parse_pins(freeze.stdout).items() if name not in NOT_LOCKED}


def run_suite(venv: Path) -> bool:
    for check in CHECKS:
        command = [str(venv / "bin" / check[0]), *check[1:]]
        print("$", " ".join(check), flush=True)
        # LORA_LOOM_UNLOCKED: the one test that checks the installed versions against the lock steps aside.
        environment = {**os.environ, "LORA_LOOM_UNLOCKED": "1"}
        if subprocess.run(command, cwd=ROOT, env=environment).returncode != 0:
            return False
    return True


def print_drift(locked: dict[str, str], newest: dict[str, str]) -> int:
    rows = [
        (name, locked.get(name, "—"), newest.get(name, "—"))
        for name in sorted(set(locked) | set(newest))
        if locked.get(name) != newest.get(name)
    ]
    if not rows:
        print("the newest versions are the locked ones")
        return 0
    width = max(len(name) for name, _, _ in rows)
    print(f"{'package':<{width}}  {'lock':<14} newest")
    for name, old, new in rows:
        print(f"{name:<{width}}  {old:<14} {new}")
    return len(rows)


def write_lock(pins: dict[str, str], extra: list[str]) -> None:
    header = [
        "# The dependency set the test suite last passed with: pip constraints for the README's commands and .ci/run.",
        f"# Written by `python scripts/deps.py lock` on {datetime.date.today()} (Python {platform.python_version()},",
        f"# {TORCH}, which is not pinned here: the README's install line picks the CPU or CUDA build).",
    ]
    if extra:
        header.append(f"# Resolved with the extra caps: {' '.join(extra)}")
    LOCK.write_text("\n".join(header + [f"{name}=={pins[name]}" for name in sorted(pins)]) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["drift", "lock"])
    parser.add_argument(
        "--with",
        dest="extra",
        action="append",
        default=[],
        metavar="SPEC",
        help="an extra requirement for the resolution, e.g. 'transformers<5.24' (repeatable)",
    )
    parser.add_argument("--venv", type=Path, help="build the venv here and keep it (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.venv is not None and args.venv.resolve() == (ROOT / ".venv").resolve():
        parser.error("--venv must not be the repository's own .venv (it is rebuilt from scratch)")

    with tempfile.TemporaryDirectory(prefix="lora-loom-deps-") as scratch:
        venv = args.venv or Path(scratch) / "venv"
        newest = make_env(venv, args.extra)
        passed = run_suite(venv)
    locked = parse_pins(LOCK.read_text()) if LOCK.exists() else {}
    print(
        f"\nnewest set{' (with ' + ' '.join(args.extra) + ')' if args.extra else ''}: "
        f"{'suite PASSED' if passed else 'suite FAILED'}; differences from {LOCK.name}:"
    )
    print_drift(locked, newest)
    if args.command == "lock":
        if not passed:
            print(f"{LOCK.name} left as it is: the suite failed on the new set")
            return 1
        write_lock(newest, args.extra)
        print(f"wrote {LOCK.name}: {len(newest)} packages; commit it with the suite result")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
