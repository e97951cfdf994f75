"""Contrastive losses and the collective that feeds them (see ``gather.py``)."""
from pretrain.losses.contrastive import ClipLoss
from pretrain.losses.gather import gather_no_grad, gather_with_grad, world_info

__all__ = ["ClipLoss", "gather_no_grad", "gather_with_grad", "world_info"]
