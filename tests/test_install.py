"""The README's commands and CI install through one pinned set (requirements.lock), and torch stays out of it."""

import os
import re
from importlib.metadata import PackageNotFoundError, requires, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
LOCK_FLAG = "-c requirements.lock"


def locked() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, pinned = line.split("==")
            pins[canonical(name)] = pinned
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [line for block in blocks for line in block.splitlines() if ".venv/bin/pip install" in line]


def test_readme_commands_and_ci_install_from_the_lock():
    commands = readme_commands()
    assert len(commands) == 2, commands  # the main command and the test command
    assert all(LOCK_FLAG in command and "torch==2.13.0" in command for command in commands)
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = next(command for command in commands if "pytest" in command)
    assert test_command in ci.splitlines(), ".ci/run must run the README's test command verbatim"


def test_the_lock_pins_every_dependency_within_pyproject_ranges_and_not_torch():
    requirements = [Requirement(r) for r in requires("lora-loom")]  # pyproject's dependencies and extras
    assert {"diffusers", "peft", "pytest"} <= {r.name for r in requirements}
    pins = locked()
    assert "torch" not in pins  # the README's line picks the CPU or CUDA build; a `+cpu` pin would break GPU users
    assert not [pinned for pinned in pins.values() if "+" in pinned]  # no local version strings at all
    for requirement in requirements:
        if requirement.name == "torch":
            continue
        name = canonical(requirement.name)
        assert name in pins, f"{name} is a dependency but not in requirements.lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (requirement, pins[name])


@pytest.mark.skipif(
    os.environ.get("LORA_LOOM_UNLOCKED") == "1", reason="scripts/deps.py runs the suite on the newest set on purpose"
)
def test_this_environment_has_the_locked_versions():
    """The suite runs on what the lock says (catches an install line that bypasses the lock)."""
    different = {}
    for name, pinned in locked().items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            continue  # platform-specific extras of other platforms
        if installed != pinned:
            different[name] = (pinned, installed)
    assert not different, f"installed versions differ from requirements.lock (locked, installed): {different}"
