"""`python -m galore_train ...` (what `torchrun -m galore_train` runs)."""

from galore_train.cli import main

main()
