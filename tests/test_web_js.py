"""The editor extensions' logic (web/js/*.js) under node's built-in test runner (tests/js/*.test.mjs)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed (the JS tests need node >= 18)")
def test_javascript_modules_pass_their_node_tests():
    tests = sorted(str(path) for path in (ROOT / "tests" / "js").glob("*.test.mjs"))
    assert tests
    done = subprocess.run(["node", "--test", *tests], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "# fail 0" in done.stdout


def test_every_extension_file_is_an_es_module_that_node_can_parse():
    if shutil.which("node") is None:
        pytest.skip("Node.js is not installed")
    for path in sorted((ROOT / "web").rglob("*.js")):
        done = subprocess.run(["node", "--check", str(path)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (path.name, done.stderr)
