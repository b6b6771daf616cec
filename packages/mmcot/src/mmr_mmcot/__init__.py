"""Multimodal Chain-of-Thought (Zhang et al. 2023): gated-fusion T5 on ScienceQA."""

import importlib.metadata

# The installed distribution's version; its one source is shared/src/mmr_core/_version.py (see hatch_build.py).
__version__ = importlib.metadata.version("mmr-mmcot")
