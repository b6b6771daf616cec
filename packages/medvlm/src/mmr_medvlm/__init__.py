"""Medical image understanding with pretrained VLMs (Qin et al., ICLR 2023): GLIP with attribute prompts."""

__version__ = "0.1.0"
