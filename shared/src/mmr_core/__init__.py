"""mmr_core: the shared core of the mmr monorepo."""

from mmr_core._version import __version__

__all__ = ["__version__"]
