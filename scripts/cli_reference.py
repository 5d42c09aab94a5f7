"""Print docs/cli.md: every `galore-train pretrain` flag, from TrainConfig (the single source of truth).

    python scripts/cli_reference.py > docs/cli.md      (tests/test_docs.py checks it is current)
"""

from __future__ import annotations

import dataclasses
from itertools import groupby

from galore_train.cli import _flag
from galore_train.config import TrainConfig


def reference() -> str:
    lines = ["# `galore-train pretrain` flags", "",
             "Generated from `galore_train/config.py` by `python scripts/cli_reference.py > docs/cli.md`.",
             "Every flag is also a field of the `TrainConfig` saved as `train_config.json` in each checkpoint.", ""]
    fields = dataclasses.fields(TrainConfig)
    for section, members in groupby(fields, key=lambda f: f.metadata["section"]):
        lines += [f"## {section}", "", "| flag | default | meaning |", "| --- | --- | --- |"]
        for field in members:
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            shown = "" if default is None or default == [] else f"`{default}`"
            lines.append(f"| `{_flag(field)}` | {shown} | {field.metadata['help']} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference(), end="")
