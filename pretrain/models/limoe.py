"""LiMoE (Mustafa et al. 2022): one transformer, shared by images and text, with MoE MLPs.

Each modality has its own input embedding (patches / token ids with learned positions), final
norm, pooling and projection; every layer in between is shared. The two modalities go through
the shared layers in separate calls, so each MoE layer routes, fills capacity and reports its
statistics per modality (what LIMoE's per-modality entropy losses need). Text attention is
causal and pooled at eos, as in our CLIP text tower; images attend fully and are mean-pooled.
Sizes: ``model.vision`` gives the shared width/depth/heads; ``model.text`` only the caption length
and vocabulary.

Text tokens after the eos are padding: the causal attention keeps them out of every real token's
features, and the MoE layers do not route them (see :mod:`pretrain.models.moe`), so they take no
expert slot and stay out of the routing statistics and auxiliary losses.

The shared layers are initialised like timm's ViT (truncated-normal weights of std 0.02, zero
biases). With PyTorch's default Linear initialisation their biases (up to 1/sqrt(width)) dwarf the
0.02-std token and position embeddings, so after the first layer every text token is mostly one
vector shared by all of them: at initialisation 82% of the text tokens' squared norm at the second
MoE layer was that shared part, and the router sent every text token to one expert (measured on the
demo LiMoE; 32% and four experts in use with this initialisation).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from timm.layers import Mlp, PatchEmbed
from timm.models.vision_transformer import Attention, init_weights_vit_timm
from torch import nn

from pretrain.config import ModelConfig, MoeConfig
from pretrain.models.base import ContrastiveModel, transformer_flops
from pretrain.models.moe import MoeMlp, RoutingStats


def is_moe_layer(index: int, every: int) -> bool:
    """The last layer of each group of ``every`` is an MoE (V-MoE's "every other layer")."""
    return index % every == every - 1


class SharedBlock(nn.Module):
    """Pre-norm transformer block whose MLP is dense or a mixture of experts."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, moe: Optional[MoeConfig]) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp: nn.Module = (
            MoeMlp(width, hidden, moe.num_experts, moe.top_k, moe.capacity_factor, moe.noise_std,
                   router_impl=moe.router_impl.value)
            if moe is not None else Mlp(width, hidden)
        )
        # timm's ViT initialisation (see the module docstring); experts and router keep their own.
        self.attn.apply(init_weights_vit_timm)
        if not isinstance(self.mlp, MoeMlp):
            self.mlp.apply(init_weights_vit_timm)

    def forward(self, x: torch.Tensor, is_causal: bool,
                real: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[RoutingStats]]:
        """x (B, N, W) -> (B, N, W), routing stats of this call if the MLP has experts; ``real``:
        the rows of x.reshape(-1, W) the experts route (None: all)."""
        x = x + self.attn(self.norm1(x), is_causal=is_causal)
        h = self.norm2(x)
        if isinstance(self.mlp, MoeMlp):
            out, stats = self.mlp(h, real)
            return x + out, stats
        return x + self.mlp(h), None


class LiMoE(ContrastiveModel):
    def __init__(self, cfg: ModelConfig, eos_id: int) -> None:
        super().__init__(cfg)
        v, t, m = cfg.vision, cfg.text, cfg.moe
        if t.vocab_size <= eos_id:
            raise ValueError(f"model.text.vocab_size={t.vocab_size} must exceed the eos id {eos_id}")
        self.eos_id = eos_id
        width = v.width
        self.patch_embed = PatchEmbed(v.image_size, v.patch_size, 3, width)
        self.image_pos = nn.Parameter(torch.empty(self.patch_embed.num_patches, width))
        self.token_embedding = nn.Embedding(t.vocab_size, width)
        self.text_pos = nn.Parameter(torch.empty(t.context_length, width))
        self.blocks = nn.ModuleList(
            SharedBlock(width, v.heads, v.mlp_ratio, m if is_moe_layer(i, m.every) else None) for i in range(v.layers)
        )
        self.image_norm = nn.LayerNorm(width)
        self.text_norm = nn.LayerNorm(width)
        self.image_proj = nn.Linear(width, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(width, cfg.embed_dim, bias=False)
        for p in (self.image_pos, self.text_pos):
            nn.init.normal_(p, std=0.02)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.image_proj.weight, std=width**-0.5)
        nn.init.normal_(self.text_proj.weight, std=width**-0.5)

    def _shared(self, x: torch.Tensor, is_causal: bool,
                real: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, list[RoutingStats]]:
        """x (B, N, W) through every shared layer -> (B, N, W), stats of each MoE layer in order;
        ``real``: the rows of x.reshape(-1, W) the experts route (None: all)."""
        routing = []
        for block in self.blocks:
            x, stats = block(x, is_causal, real)
            if stats is not None:
                routing.append(stats)
        return x, routing

    def _image(self, images: torch.Tensor) -> tuple[torch.Tensor, list[RoutingStats]]:
        x = self.patch_embed(images) + self.image_pos  # (B, N, W)
        x, routing = self._shared(x, is_causal=False)
        pooled = self.image_norm(x).mean(dim=1)  # (B, W)
        return F.normalize(self.image_proj(pooled), dim=-1), routing  # (B, D)

    def _text(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list[RoutingStats]]:
        B, L = tokens.shape
        x = self.token_embedding(tokens) + self.text_pos[:L]  # (B, L, W)
        eos = (tokens == self.eos_id).int().argmax(dim=-1)  # (B,)
        # Rows up to each caption's eos; nonzero() is one host sync per text forward (not per
        # layer), the price of routing only real tokens.
        real = (torch.arange(L, device=tokens.device) <= eos[:, None]).reshape(-1).nonzero().squeeze(1)  # (T,)
        # Causal, so the eos position summarises the caption and the padding after it never leaks in.
        x, routing = self._shared(x, is_causal=True, real=real)
        pooled = self.text_norm(x)[torch.arange(B, device=x.device), eos]  # (B, W)
        return F.normalize(self.text_proj(pooled), dim=-1), routing  # (B, D)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self._image(images)[0]

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._text(tokens)[0]

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, Any]:
        image_features, image_routing = self._image(images)
        text_features, text_routing = self._text(tokens)
        return {
            "image_features": image_features,  # (B, D)
            "text_features": text_features,  # (B, D)
            "logit_scale": self.scale(),  # ()
            "routing": {"image": image_routing, "text": text_routing},
        }

    def flops_per_sample(self) -> float:
        """Forward FLOPs of one pair with the ACTIVE experts: each token runs top_k expert MLPs."""
        v, t, m = self.cfg.vision, self.cfg.text, self.cfg.moe
        patches = (v.image_size // v.patch_size) ** 2
        moe_layers = sum(is_moe_layer(i, m.every) for i in range(v.layers))
        total = 0.0
        for tokens in (patches, t.context_length):
            total += transformer_flops(tokens, v.width, v.layers, v.mlp_ratio)
            mlp = 4 * v.mlp_ratio * v.width**2  # one expert's two matmuls, per token
            total += moe_layers * tokens * ((m.top_k - 1) * mlp + 2 * v.width * m.num_experts)
        embed = patches * 2 * 3 * v.patch_size**2 * v.width
        heads = 2 * 2 * self.cfg.embed_dim * v.width
        return float(total + embed + heads)
