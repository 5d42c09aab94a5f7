"""scripts/demo.sh and scripts/test.sh, the README's two commands: they must install galore-train on a fresh
machine that has nothing but `python3` (scripts/_python.sh: the project's .venv).

The install guard once was `python -c "import galore_train"`, which succeeds from the project root with nothing
installed (the folder itself is importable), so the install was skipped and the run died on `import typer`.
.ci/run runs both commands from a clean checkout; these tests pin the guard and the scripts down in seconds.
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
PYTHON_SETUP = ROOT / "scripts" / "_python.sh"


def demo_guard() -> list[str]:
    """The command whose failure makes scripts/_python.sh run `pip install` (with `python` for its "$PY")."""
    text = PYTHON_SETUP.read_text()
    match = re.search(r'^if ! (.+?); then[^\n]*\n\s*"\$PY" -m pip install', text, re.MULTILINE)
    assert match, "_python.sh installs behind an `if ! <guard>; then` line"
    return shlex.split(match.group(1).replace('"$PY"', "python"))


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


def readme_quick_start() -> list[str]:
    """The command lines of the README's "Quick start (two commands)" block, comments dropped."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", text, re.DOTALL).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readmes_two_commands() -> None:
    commands = readme_quick_start()
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    ci = [line.split("#")[0].strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert 'STEPS=3 OUT="$demo_out" bash scripts/demo.sh' in ci and commands[1] in ci


@pytest.mark.parametrize("script", ["demo.sh", "test.sh", "_python.sh"])
def test_the_two_commands_need_no_python_on_path(script: str) -> None:
    """Stock Debian/Ubuntu has `python3` only: no bare `python` (nor pip into the system Python) anywhere."""
    text = (ROOT / "scripts" / script).read_text()
    code = "\n".join(line.split("#")[0] for line in text.splitlines())
    assert not re.search(r"(^|[\s;(])python(\s|$)", code), f"{script} calls `python`"
    assert not re.search(r"(^|[;&|(])\s*pip3? ", code, re.MULTILINE), f"{script} runs pip outside a chosen Python"
    if script != "_python.sh":
        assert "source scripts/_python.sh" in text and '"$PY" -m ' in text
