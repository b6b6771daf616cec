"""ImageBind (Girdhar et al. 2023): one embedding space for six modalities."""

import importlib.metadata

from .checkpoint import (
    CheckpointMismatchError,
    CheckpointReadError,
    load_imagebind,
    load_official_checkpoint,
    load_safetensors,
    save_safetensors,
)
from .export import export_modality
from .model import MODALITIES, ImageBind, ImageBindConfig, build_imagebind, parameter_counts
from .tokenizer import CLIPTokenizer

# The installed distribution's version; its one source is shared/src/mmr_core/_version.py (see hatch_build.py).
__version__ = importlib.metadata.version("mmr-imagebind")

__all__ = [
    "MODALITIES",
    "CLIPTokenizer",
    "CheckpointMismatchError",
    "CheckpointReadError",
    "ImageBind",
    "ImageBindConfig",
    "build_imagebind",
    "export_modality",
    "load_imagebind",
    "load_official_checkpoint",
    "load_safetensors",
    "parameter_counts",
    "save_safetensors",
]
