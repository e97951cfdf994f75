"""The all-gather contrastive loss: maths on one process, and 2 gloo ranks == 1 process."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pretrain.config import ModelConfig, TextConfig, VisionConfig
from pretrain.losses import ContrastiveLoss
from pretrain.models import CLIP
from pretrain.task import ContrastiveTask
from launch.local import free_port

TINY = ModelConfig(embed_dim=16, vision=VisionConfig(image_size=16, patch_size=8, width=32, layers=1, heads=2),
                   text=TextConfig(context_length=8, vocab_size=50, width=32, layers=1, heads=2))


def reference_clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: float) -> torch.Tensor:
    """Row-by-row symmetric InfoNCE, written out independently of ContrastiveLoss."""
    n = img.shape[0]
    total = torch.zeros(())
    for i in range(n):
        row_i = scale * img[i] @ txt.T  # image i against all texts, (N,)
        row_t = scale * txt[i] @ img.T  # text i against all images, (N,)
        total = total - F.log_softmax(row_i, 0)[i] - F.log_softmax(row_t, 0)[i]
    return total / (2 * n)


@pytest.mark.parametrize("local_loss", [True, False])
def test_single_process_loss_matches_reference(local_loss: bool) -> None:
    torch.manual_seed(0)
    img = F.normalize(torch.randn(8, 16), dim=-1)
    txt = F.normalize(torch.randn(8, 16), dim=-1)
    got = ContrastiveLoss(local_loss)(img, txt, torch.tensor(14.3))
    assert got.item() == pytest.approx(reference_clip_loss(img, txt, 14.3).item(), rel=1e-5)


def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, 16, 16, generator=g)  # (N, 3, H, W)
    tokens = torch.randint(4, 50, (n, 8), generator=g)  # (N, L)
    tokens[:, -1] = 3  # eos
    return images, tokens


def loss_and_grads(task: ContrastiveTask, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
    out = task(images, tokens)
    out["loss"].backward()
    return out["loss"].detach(), {n: p.grad.clone() for n, p in task.named_parameters()}


def _rank_main(rank: int, world: int, port: int, local_loss: bool, out: str, impl: str = "naive") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    task = ContrastiveTask(CLIP(TINY, eos_id=3), ContrastiveLoss(local_loss, impl=impl, tile=3))
    images, tokens = batch(8)
    rows = slice(rank * 4, (rank + 1) * 4)  # this rank's half of the global batch
    loss, grads = loss_and_grads(task, images[rows], tokens[rows])
    # What DeepSpeed / DDP do with gradients: average over data-parallel ranks.
    for g in [loss, *grads.values()]:
        dist.all_reduce(g)
        g /= world
    if rank == 0:
        torch.save({"loss": loss, "grads": grads}, out)
    dist.destroy_process_group()


@pytest.mark.parametrize("local_loss", [True, False])
@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_two_gloo_ranks_equal_one_process_on_the_whole_batch(tmp_path: Path, local_loss: bool, impl: str) -> None:
    """The distributed loss (either implementation) against one process with the plain loss."""
    out = tmp_path / "rank0.pt"
    mp.spawn(_rank_main, args=(2, free_port(), local_loss, str(out), impl), nprocs=2, join=True)
    distributed = torch.load(out)

    torch.manual_seed(0)
    task = ContrastiveTask(CLIP(TINY, eos_id=3), ContrastiveLoss(local_loss))
    loss, grads = loss_and_grads(task, *batch(8))

    assert distributed["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    assert grads.keys() == distributed["grads"].keys()
    for name, g in grads.items():
        torch.testing.assert_close(distributed["grads"][name], g, rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")
    assert grads["model.logit_scale"].abs().item() > 0
