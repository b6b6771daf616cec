"""GLIP's text backbone: BERT (``bert-base-uncased`` sizes in GLIP-T) from transformers.

Module names mirror microsoft/GLIP (``language_backbone.body.model``), so official BERT weights load as they
are. The output is GLIP's language dict, the input of the fusion head.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmr_medvlm.config import GLIPConfig


def bert_config(cfg: GLIPConfig) -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.text_dim, num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads, intermediate_size=cfg.text_intermediate,
        max_position_embeddings=cfg.text_max_positions, hidden_dropout_prob=cfg.text_dropout,
        attention_probs_dropout_prob=cfg.text_dropout,
    )


class _LanguageBody(nn.Module):
    def __init__(self, cfg: GLIPConfig) -> None:
        super().__init__()
        from transformers import BertModel

        self.model = BertModel(bert_config(cfg), add_pooling_layer=False)


class LanguageBackbone(nn.Module):
    """BERT; returns GLIP's language dict: ``hidden`` (last layer), ``embedded`` (masked), ``masks``."""

    def __init__(self, cfg: GLIPConfig) -> None:
        super().__init__()
        self.body = _LanguageBody(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.body.model(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state
        return {"hidden": hidden, "embedded": hidden * attention_mask.unsqueeze(-1).to(hidden.dtype),
                "masks": attention_mask}

