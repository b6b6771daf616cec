"""mmr_core: the shared core of the mmr monorepo."""

__version__ = "0.1.0"
