"""galore-train: pretrain LLaMA on C4 with GaLore and other memory-efficient optimizers."""

__version__ = "0.1.0"
