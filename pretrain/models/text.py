"""Text tower over sentencepiece ids, in two forms with the same parameters:

- causal (CLIP, FLIP): position t sees tokens <= t, pooled at the end-of-text token;
- bidirectional (ALIGN's BERT-style encoder): every real token sees every other, pad tokens are
  never attended to, pooled at position 0, whose bos token serves as BERT's [CLS].
"""
from __future__ import annotations

from typing import Optional

import torch
from timm.models.vision_transformer import Block
from torch import nn

from data_prep.tokenizer import PAD_ID  # the builder owns the id contract
from pretrain.config import TextConfig


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig, eos_id: int, causal: bool = True) -> None:
        super().__init__()
        if cfg.vocab_size <= eos_id:
            raise ValueError(f"model.text.vocab_size={cfg.vocab_size} must exceed the eos id {eos_id}")
        self.eos_id = eos_id
        self.causal = causal
        self.context_length = cfg.context_length
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.blocks = nn.ModuleList(
            [Block(cfg.width, cfg.heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True) for _ in range(cfg.layers)]
        )
        self.ln_final = nn.LayerNorm(cfg.width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def forward(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens (B, L) int64 -> pooled features (B, width).

        ``positions`` (B, L) int64, increasing along each row: the original position of each given
        token when only a subset of a caption is encoded (FLIP's text masking); None: 0..L-1.
        Causal rows need exactly one eos; bidirectional rows must keep bos at index 0.
        """
        B, L = tokens.shape
        if positions is None:
            x = self.token_embedding(tokens) + self.positional_embedding[:L]  # (B, L, W)
        else:
            x = self.token_embedding(tokens) + self.positional_embedding[positions]  # (B, L, W)
        if self.causal:
            for block in self.blocks:
                # Position t sees tokens <= t, so the eos position summarises the whole caption and
                # padding after it never leaks in.
                x = block(x, is_causal=True)  # (B, L, W)
            x = self.ln_final(x)
            eos_pos = (tokens == self.eos_id).int().argmax(dim=-1)  # (B,)
            return x[torch.arange(B, device=x.device), eos_pos]  # (B, W)
        # Boolean mask, True = may attend, broadcast over heads and queries to SDPA's
        # (B, heads, L, L): padding would otherwise change the embedding with the context
        # length. No row is fully masked because bos is never padding.
        keep = (tokens != PAD_ID)[:, None, None, :]  # (B, 1, 1, L)
        for block in self.blocks:
            x = block(x, attn_mask=keep)  # (B, L, W)
        return self.ln_final(x[:, 0])  # (B, W): [CLS], the bos token at index 0
