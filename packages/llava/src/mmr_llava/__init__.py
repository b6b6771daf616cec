"""Visual Instruction Tuning (Liu et al. 2023): LLaVA."""

__version__ = "0.1.0"
