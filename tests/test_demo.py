"""scripts/demo.sh, the README's first command: it must install galore-train on a fresh machine.

Its guard once was `python -c "import galore_train"`, which succeeds from the project root with nothing
installed (the folder itself is importable), so the install was skipped and the run died on `import typer`.
.ci/run runs the demo itself in a fresh virtualenv; these tests pin the guard down in seconds.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "scripts" / "demo.sh"


def demo_guard() -> list[str]:
    """The command whose failure makes demo.sh run `pip install`."""
    match = re.search(r"^if ! (.+?); then[^\n]*\n\s*python -m pip install", DEMO.read_text(), re.MULTILINE)
    assert match, "demo.sh installs behind an `if ! <guard>; then` line"
    return shlex.split(match.group(1).replace("2>/dev/null", ""))


def test_guard_fails_in_a_fresh_virtualenv(tmp_path: Path) -> None:
    """Nothing installed, run from the project root (where `import galore_train` works): install."""
    fresh = tmp_path / "venv"
    venv.create(fresh, with_pip=False)
    env = {**os.environ, "PATH": f"{fresh / 'bin'}{os.pathsep}{os.environ['PATH']}", "VIRTUAL_ENV": str(fresh)}
    env.pop("PYTHONPATH", None)
    importable = subprocess.run(["python", "-c", "import galore_train"], cwd=ROOT, env=env, capture_output=True)
    assert importable.returncode == 0, "the trap: the folder is importable from the root"
    guard = subprocess.run(demo_guard(), cwd=ROOT, env=env, capture_output=True, text=True)
    assert guard.returncode != 0, "demo.sh would skip the install on a fresh machine"


def write_distribution(site: Path, requires: list[str]) -> None:
    """A stand-in installed galore-train with these Requires-Dist lines (found first on PYTHONPATH)."""
    info = site / "galore_train-0.1.0.dist-info"
    info.mkdir(parents=True)
    lines = ["Metadata-Version: 2.1", "Name: galore-train", "Version: 0.1.0"]
    lines += [f"Requires-Dist: {r}" for r in requires]
    (info / "METADATA").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "requires, ok",
    [
        (["pytest>=1"], True),
        (['pytest>=1; extra == "dev"'], True),  # the dev extra counts: the README's second command is pytest
        (['pytest>=999; extra == "dev"'], False),  # present, in a version the project excludes
        (["no-such-distribution-xyz"], False),
        (['no-such-distribution-xyz; extra == "cpu"'], True),  # the cpu extra's torch pin is not required
    ],
)
def test_guard_checks_every_requirement(tmp_path: Path, requires: list[str], ok: bool) -> None:
    write_distribution(tmp_path, requires)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "_installed.py")], env=env, capture_output=True, text=True
    )
    assert (result.returncode == 0) == ok, result.stderr
    assert ok or "not installed:" in result.stderr


def test_steps_override_keeps_the_default_demo() -> None:
    text = DEMO.read_text()
    assert 'STEPS="${STEPS:-200}"' in text and '--num-training-steps "$STEPS"' in text
    assert "STEPS=" in (ROOT / ".ci" / "run").read_text(), "CI runs a short demo (its install path) before the tests"
