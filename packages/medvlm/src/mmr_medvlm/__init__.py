"""Medical image understanding with pretrained VLMs (Qin et al., ICLR 2023): GLIP with attribute prompts.

Start with :mod:`mmr_medvlm.model` (GLIP, assembled from one module per role, listed there in reading
order); prompts are :mod:`mmr_medvlm.prompts` (the paper's auto-prompts :mod:`mmr_medvlm.autoprompt`), data,
training and evaluation :mod:`~mmr_medvlm.data`, :mod:`~mmr_medvlm.train` and :mod:`~mmr_medvlm.evaluate`. The
miniature reproduction is the separate subpackage :mod:`mmr_medvlm.miniature`, which the library never imports.
"""

import importlib.metadata

# The installed distribution's version; its one source is shared/src/mmr_core/_version.py (see hatch_build.py).
__version__ = importlib.metadata.version("mmr-medvlm")
