"""The authors' Fira optimizer, vendored unmodified for tests/test_fira_reference.py.

Source: github.com/xichen-fy/Fira at commit 5c28b13 (optimizer_torch/fira_adamw.py and
optimizer_torch/gradient_projection.py), Copyright the Fira authors, Apache License 2.0 (LICENSE in this
folder). Only this file is ours; the two modules are byte-for-byte the upstream ones (ruff skips them).
"""
