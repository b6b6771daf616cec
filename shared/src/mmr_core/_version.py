"""The one version number of the five mmr distributions.

mmr-core's build reads it here (``[tool.hatch.version]`` in ``shared/pyproject.toml``); each package's build
reads the same file (``packages/<p>/pyproject.toml``) and its ``hatch_build.py`` turns it into the package's
``mmr-core`` requirement, a range from this version up to the next minor one. The five are released together.
"""

__version__ = "0.1.0"
