"""Visual Instruction Tuning (Liu et al. 2023): LLaVA.

The library: ``model`` (config and model), ``conversation`` (templates, tokenization with labels), ``data``
(records, CLIP preprocessing, collators), ``checkpoint`` (both checkpoint layouts), ``train``, ``inference``,
``scienceqa``, ``instruct`` (instruction data through a chat model), ``cli``. The miniature reproduction
lives apart in :mod:`mmr_llava.miniature`, which no library module imports.
"""

import importlib.metadata

# The installed distribution's version; its one source is shared/src/mmr_core/_version.py (see hatch_build.py).
__version__ = importlib.metadata.version("mmr-llava")
