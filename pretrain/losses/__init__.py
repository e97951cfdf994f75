"""Contrastive losses, the collective that feeds them (see ``gather.py``), MoE router losses."""
from pretrain.losses.contrastive import ContrastiveLoss
from pretrain.losses.gather import gather_no_grad, gather_with_grad, world_info
from pretrain.losses.moe_aux import MoeAuxLoss

__all__ = ["ContrastiveLoss", "MoeAuxLoss", "gather_no_grad", "gather_with_grad", "world_info"]
