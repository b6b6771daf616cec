"""Test oracle: an independent re-statement of how the official mm-cot code computes (parity tests, benchmark).

Built the way the official ``T5ForMultimodalGeneration`` (first release) is built: one ``nn.Module`` with
``shared``, an encoder ``T5Stack``, a decoder ``T5Stack``, ``lm_head`` and the fusion layers at the top
level; the fusion runs inside every forward call, without a padding mask; greedy decoding re-runs the
whole model on the full prefix at every step (no KV cache). Its ``state_dict`` therefore has the first
release's checkpoint layout. Not meant for real use: it is deliberately slow, and it lives with the tests
(not in the wheel); `bench/bench_mmcot.py` puts this folder on `sys.path` to use it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import T5Config
from transformers.models.t5.modeling_t5 import T5Stack


class OfficialStyleMMCoT(nn.Module):
    """Reference model with the official module names and computation order."""

    def __init__(self, config: T5Config, patch_dim: int, scale_decoder_outputs: bool):
        super().__init__()
        self.config = config
        self.scale = scale_decoder_outputs
        self.model_dim = config.d_model
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        enc = copy.deepcopy(config)
        enc.is_decoder, enc.use_cache = False, False
        self.encoder = T5Stack(enc)
        self.encoder.embed_tokens = self.shared
        dec = copy.deepcopy(config)
        dec.is_decoder = True
        dec.num_layers = config.num_decoder_layers
        self.decoder = T5Stack(dec)
        self.decoder.embed_tokens = self.shared
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if scale_decoder_outputs:  # T5 v1.0 ties the output projection to the embedding
            self.lm_head.weight = self.shared.weight
        self.image_dense = nn.Linear(patch_dim, config.d_model)
        self.mha_layer = nn.MultiheadAttention(config.d_model, num_heads=1, batch_first=True)
        self.gate_dense = nn.Linear(2 * config.d_model, config.d_model)

    def forward(
        self,
        input_ids: torch.Tensor,
        image_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        decoder_input_ids: torch.Tensor,
    ) -> torch.Tensor:
        """Logits for ``decoder_input_ids`` (teacher forcing), fusion recomputed every call."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        image = self.image_dense(image_ids)
        attn, _ = self.mha_layer(hidden, image, image)
        gate = torch.sigmoid(self.gate_dense(torch.cat([hidden, attn], dim=-1)))
        hidden = (1 - gate) * hidden + gate * attn
        out = self.decoder(
            input_ids=decoder_input_ids,
            encoder_hidden_states=hidden,
            encoder_attention_mask=attention_mask,
            use_cache=False,
        ).last_hidden_state
        if self.scale:
            out = out * self.model_dim**-0.5
        return self.lm_head(out)

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        start = torch.full_like(labels[:, :1], self.config.decoder_start_token_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)

    def loss(self, input_ids, image_ids, attention_mask, labels) -> torch.Tensor:
        logits = self(input_ids, image_ids, attention_mask, self.shift_right(labels))
        return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)

    @torch.no_grad()
    def greedy(self, input_ids, image_ids, attention_mask, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding, whole forward per step (official: no cache); finished rows get padding."""
        pad, eos = self.config.pad_token_id, self.config.eos_token_id
        seq = torch.full((input_ids.shape[0], 1), self.config.decoder_start_token_id, dtype=torch.long)
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        for _ in range(max_new_tokens):
            nxt = self(input_ids, image_ids, attention_mask, seq)[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            done |= nxt == eos
            if done.all():
                break
        return seq
