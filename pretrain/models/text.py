"""Text tower: a causal transformer over sentencepiece ids, pooled at the end-of-text token."""
from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn

from pretrain.config import TextConfig


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig, eos_id: int) -> None:
        super().__init__()
        if cfg.vocab_size <= eos_id:
            raise ValueError(f"model.text.vocab_size={cfg.vocab_size} must exceed the eos id {eos_id}")
        self.eos_id = eos_id
        self.context_length = cfg.context_length
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.blocks = nn.ModuleList(
            [Block(cfg.width, cfg.heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True) for _ in range(cfg.layers)]
        )
        self.ln_final = nn.LayerNorm(cfg.width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) int64 with exactly one eos per row -> pooled features (B, width)."""
        B, L = tokens.shape
        x = self.token_embedding(tokens) + self.positional_embedding[:L]  # (B, L, W)
        for block in self.blocks:
            # Causal: position t sees tokens <= t, so the eos position summarises the whole
            # caption and padding after it never leaks in.
            x = block(x, is_causal=True)  # (B, L, W)
        x = self.ln_final(x)
        eos_pos = (tokens == self.eos_id).int().argmax(dim=-1)  # (B,)
        return x[torch.arange(B, device=x.device), eos_pos]  # (B, W)
