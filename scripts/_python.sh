# Sourced by scripts/demo.sh and scripts/test.sh (the README's two commands): sets PY to a Python that has
# galore-train and its dev requirements installed, and puts its bin/ first on PATH. Needs nothing but `python3`:
# where no Python at hand has the project, it makes the project's own virtual environment (.venv, git-ignored)
# and installs into it, so a system Python that pip refuses to touch (PEP 668: Debian, Ubuntu) is never touched.
# Which Python, first match:
#   PYTHON=/path/to/python      that one (installed into if it lacks something)
#   an active virtualenv        $VIRTUAL_ENV/bin/python (installed into if it lacks something)
#   .venv/bin/python            the project's environment, once made
#   python3                     if galore-train is installed there with every requirement (scripts/_installed.py)
#   otherwise                   python3 -m venv .venv, then pip install -e ".[dev,cpu]" into it
if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif [[ -n "${VIRTUAL_ENV:-}" ]]; then
  PY="$VIRTUAL_ENV/bin/python"
elif [[ -x .venv/bin/python ]]; then
  PY=.venv/bin/python
elif command -v python3 >/dev/null && python3 scripts/_installed.py 2>/dev/null; then
  PY="$(command -v python3)"
else
  if ! command -v python3 >/dev/null; then
    echo "error: no python3 on PATH: install Python >= 3.10" >&2
    exit 2
  fi
  echo "making the project's virtual environment .venv (python3 -m venv)" >&2
  if ! python3 -m venv .venv; then
    rm -rf .venv
    echo "error: python3 -m venv failed: on Debian/Ubuntu install python3-venv (apt install python3-venv)" >&2
    exit 2
  fi
  PY=.venv/bin/python
fi
if ! "$PY" scripts/_installed.py; then  # installed with its dependencies (not just importable)
  "$PY" -m pip install -e ".[dev,cpu]"
fi
PATH="$(cd "$(dirname "$PY")" && pwd):$PATH"
export PATH
