"""Multimodal Chain-of-Thought (Zhang et al. 2023): gated-fusion T5 on ScienceQA."""

__version__ = "0.1.0"
