"""ImageBind (Girdhar et al. 2023): one embedding space for six modalities."""

__version__ = "0.1.0"
