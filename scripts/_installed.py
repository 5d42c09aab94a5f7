"""Exit 0 when galore-train is installed with every requirement of it and its dev extra, else 1 (says why).

scripts/demo.sh installs the project unless this passes. `import galore_train` would prove nothing: the
project folder is importable from its own root, with none of its dependencies installed.
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, distribution, version


def missing_requirements() -> list[str]:
    """Requirements of the installed galore-train (and of its dev extra: pytest, for the README's tests)
    that are absent or in a version they exclude; all of them when galore-train itself is not installed."""
    try:
        requires = distribution("galore-train").requires or []
    except PackageNotFoundError:
        return ["galore-train"]
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip's own copy: every virtualenv has pip
        from pip._vendor.packaging.requirements import Requirement
    missing = []
    for line in requires:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": "dev"}):
            continue
        try:
            found = version(requirement.name)
        except PackageNotFoundError:
            missing.append(line)
            continue
        if not requirement.specifier.contains(found, prereleases=True):
            missing.append(f"{line} (found {found})")
    return missing


if __name__ == "__main__":
    absent = missing_requirements()
    if absent:
        print(f"not installed: {', '.join(absent)}", file=sys.stderr)
    sys.exit(1 if absent else 0)
