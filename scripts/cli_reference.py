"""Print docs/cli.md: what a command line implies (galore_train/implied.py), every `galore-train pretrain` flag,
from TrainConfig (the single source of truth), the
flags `galore-train memory` shares with it, the --optimizer names from the registry and the `--recipe paper`
settings from galore_train/recipes.py.

    python scripts/cli_reference.py > docs/cli.md      (tests/test_docs.py checks it is current)
"""

from __future__ import annotations

import dataclasses
from itertools import groupby

from galore_train import implied
from galore_train.cli import MEMORY_FIELDS
from galore_train.config import TrainConfig, flag
from galore_train.memory import fit
from galore_train.recipes import common_settings, recipe_rows
from galore_train.registry import OPTIMIZERS


def reference() -> str:
    lines = [
        "# `galore-train pretrain` flags",
        "",
        "Generated from `galore_train/config.py` by `python scripts/cli_reference.py > docs/cli.md`.",
        "Every flag is also a field of the `TrainConfig` saved as `train_config.json` in each checkpoint.",
        "",
        "## What a command line implies",
        "",
        # the rules' one statement: galore_train/implied.py's docstring, and memory/fit.py's for the GPU memory check
        implied.__doc__.split("\n\n", 1)[1].strip(),
        "",
        "Each filled-in value is printed at start (`note: ...`, with its source), each ignored flag as one "
        "`warning: ...` line. `galore-train eval` without `--checkpoint` scores the newest run under `runs/`.",
        "",
        "**On a GPU.** " + " ".join(fit.__doc__.split()),
        "",
    ]
    fields = dataclasses.fields(TrainConfig)
    for section, members in groupby(fields, key=lambda f: f.metadata["section"]):
        lines += [f"## {section}", "", "| flag | default | meaning |", "| --- | --- | --- |"]
        for field in members:
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            shown = "" if default is None or default == [] else f"`{default}`"
            lines.append(f"| `{flag(field.name)}` | {shown} | {field.metadata['help']} |")
        lines.append("")
    memory_flags = ", ".join(f"`{flag(field.name)}`" for field in fields if field.name in MEMORY_FIELDS)
    lines += [
        "## `galore-train memory`",
        "",
        f"Takes these flags of `pretrain`, with the same defaults: {memory_flags}; and its own `--compare` "
        "(every optimizer side by side), `--paper` (the paper's Table 2) and `--nproc N` (one GPU's memory "
        "of a run on N, under `--distributed`), `--comm` (with `--nproc N`: gradient bytes per GPU and step under "
        "DDP, full all-reduce vs low-rank sync, docs/distributed.md). See docs/memory.md.",
        "",
        "## `galore-train optimizers`",
        "",
        "The `--optimizer` names (from `galore_train/registry.py`), with the state each keeps per m x n target "
        "weight (m <= n, rank r):",
        "",
        "| name | kind | `--8bit` | state |",
        "| --- | --- | --- | --- |",
    ]
    for spec in OPTIMIZERS.values():
        variant = f"`{spec.other_8bit}`" if spec.other_8bit else ""
        lines.append(f"| `{spec.name}` | {spec.kind} | {variant} | {spec.state} |")
    lines += [
        "",
        "## `galore-train recipes`",
        "",
        "What `--recipe paper` fills in (from `galore_train/recipes.py`; explicit flags win); every recipe also "
        f"sets {common_settings()} (warm-up: the default 10% of the steps). Sources and assumptions: "
        "docs/beyond_galore.md and the comments in recipes.py.",
        "",
        "| model | `--optimizer` | settings | source |",
        "| --- | --- | --- | --- |",
    ]
    for model, names, settings, source in recipe_rows():
        lines.append(f"| `{model}` | {names} | {settings} | {source} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference(), end="")
