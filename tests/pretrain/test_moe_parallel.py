"""Expert parallelism over 2 real gloo ranks (DeepSpeed's expert groups and all-to-all) changes
nothing in the maths: outputs and gradients equal a single process holding every expert."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.config import Arch, ModelConfig, MoeConfig, TextConfig, VisionConfig
from pretrain.losses import ContrastiveLoss, MoeAuxLoss
from pretrain.models.limoe import LiMoE
from pretrain.models.moe import MoeMlp
from pretrain.task import ContrastiveTask
from launch.local import free_port

D, H, E, T = 16, 32, 4, 24  # width, expert hidden, experts, tokens per rank


def layer(top_k: int) -> MoeMlp:
    torch.manual_seed(0)  # same full set of expert weights on every rank and in the reference
    moe = MoeMlp(D, H, E, top_k=top_k, capacity_factor=1.0)
    # A router that prefers expert 0: overflow, so capacity and Batch Priority Routing matter.
    with torch.no_grad():
        moe.router.weight[0] += 0.5
    return moe


def tokens(rank: int) -> torch.Tensor:
    return torch.randn(T, D, generator=torch.Generator().manual_seed(100 + rank))  # (T, D)


def probe() -> torch.Tensor:
    return torch.randn(T, D, generator=torch.Generator().manual_seed(7))  # fixed loss direction


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from pretrain.engine import init_distributed

    init_distributed("gloo")


def _layer_rank(rank: int, world: int, port: int, top_k: int, out: str) -> None:
    _init(rank, world, port)
    from pretrain.engine import enable_expert_parallel

    moe = layer(top_k)
    assert enable_expert_parallel(moe, ep_size=world) == 1
    x = tokens(rank).requires_grad_()
    y, stats = moe(x)
    (y * probe()).sum().backward()
    torch.save({"y": y.detach(), "x_grad": x.grad, "kept": stats.kept,
                "grads": {n: p.grad for n, p in moe.named_parameters()}}, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.parametrize("top_k", [1, 2])
def test_two_rank_expert_parallel_layer_equals_one_process_with_all_experts(tmp_path: Path, top_k: int) -> None:
    out = str(tmp_path / "ep")
    mp.spawn(_layer_rank, args=(2, free_port(), top_k, out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]

    reference = layer(top_k)  # every expert in this process, each rank's tokens routed as that rank
    grad_sum = {n: torch.zeros_like(p) for n, p in reference.named_parameters()}
    for r, got in enumerate(ranks):
        reference.zero_grad()
        x = tokens(r).requires_grad_()
        y, stats = reference(x)
        (y * probe()).sum().backward()
        assert not stats.kept.all(), "the case must overflow an expert"
        torch.testing.assert_close(got["kept"], stats.kept)
        torch.testing.assert_close(got["y"], y.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["x_grad"], x.grad, rtol=1e-5, atol=1e-6)
        for n, p in reference.named_parameters():
            grad_sum[n] += p.grad
    # Each rank's gradient is non-zero only for the experts it computes (tokens of both ranks);
    # their sum, which data-parallel reduction takes, is the whole model's gradient.
    for n, g in grad_sum.items():
        torch.testing.assert_close(ranks[0]["grads"][n] + ranks[1]["grads"][n], g, rtol=1e-4, atol=1e-6, msg=n)
    half = E // 2
    assert ranks[0]["grads"]["w1"][half:].abs().sum() == 0 and ranks[1]["grads"]["w1"][:half].abs().sum() == 0
    assert ranks[0]["grads"]["w1"][:half].abs().sum() > 0 and ranks[1]["grads"]["w1"][half:].abs().sum() > 0


TINY_LIMOE = ModelConfig(
    arch=Arch.limoe, embed_dim=16,
    vision=VisionConfig(image_size=16, patch_size=4, width=32, layers=2, heads=2),
    text=TextConfig(context_length=8, vocab_size=50),
    moe=MoeConfig(num_experts=4, top_k=1, capacity_factor=1.0, every=2, importance_weight=0.01),
)


def _model_rank(rank: int, world: int, port: int, ep_size: int, out: str) -> None:
    _init(rank, world, port)
    from pretrain.engine import enable_expert_parallel

    torch.manual_seed(0)
    task = ContrastiveTask(LiMoE(TINY_LIMOE, eos_id=3), ContrastiveLoss(), MoeAuxLoss(TINY_LIMOE.moe))
    enable_expert_parallel(task, ep_size)
    g = torch.Generator().manual_seed(1 + rank)
    images = torch.randn(4, 3, 16, 16, generator=g)  # (B, 3, H, W) this rank's half
    text = torch.randint(4, 50, (4, 8), generator=g)
    text[:, -1] = 3
    result = task(images, text)
    result["loss"].backward()
    grads = {n: p.grad.clone() for n, p in task.named_parameters()}
    for grad in grads.values():  # what DeepSpeed does with every gradient: the data-parallel mean
        dist.all_reduce(grad)
        grad /= world
    torch.save({"loss": result["loss"].detach(), "metrics": result["metrics"], "grads": grads}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_limoe_with_expert_parallelism_equals_plain_data_parallel(tmp_path: Path) -> None:
    """The whole tower and its losses (contrastive, importance, load, both entropies) on 2 ranks:
    ep_size=2 gives the losses, metrics and averaged gradients of ep_size=1."""
    runs = {}
    for ep in (1, 2):
        out = str(tmp_path / f"ep{ep}")
        mp.spawn(_model_rank, args=(2, free_port(), ep, out), nprocs=2, join=True)
        runs[ep] = [torch.load(f"{out}.{r}") for r in range(2)]
    for r in range(2):
        torch.testing.assert_close(runs[2][r]["loss"], runs[1][r]["loss"], rtol=1e-5, atol=1e-6)
        for k, v in runs[1][r]["metrics"].items():
            torch.testing.assert_close(runs[2][r]["metrics"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    for n, g in runs[1][0]["grads"].items():
        torch.testing.assert_close(runs[2][0]["grads"][n], g, rtol=1e-4, atol=1e-6, msg=n)
    assert runs[1][0]["metrics"]["moe/layer0/image/dropped_frac"] >= 0


def _entropy_rank(rank: int, world: int, port: int, out: str) -> None:
    _init(rank, world, port)
    from pretrain.losses.gather import all_reduce_sum_with_grad
    from pretrain.losses.moe_aux import global_entropy_loss

    logits = torch.randn(10, 4, generator=torch.Generator().manual_seed(rank)).mul(2).requires_grad_()
    index = logits.argmax(dim=-1, keepdim=True)
    loss = global_entropy_loss(logits.softmax(dim=-1), index, tau=math.log(4), reduce_fn=all_reduce_sum_with_grad)
    loss.backward()
    torch.save({"loss": loss.detach(), "grad": logits.grad}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_global_entropy_is_taken_over_every_ranks_tokens(tmp_path: Path) -> None:
    """Across 2 real ranks: the loss of the global batch, and each rank's router gets its share
    of that loss's gradient (the sum over ranks' losses, as data-parallel training sums them)."""
    from pretrain.losses.moe_aux import global_entropy_loss

    out = str(tmp_path / "h")
    mp.spawn(_entropy_rank, args=(2, free_port(), out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    logits = torch.cat([torch.randn(10, 4, generator=torch.Generator().manual_seed(r)).mul(2) for r in range(2)]).requires_grad_()
    reference = global_entropy_loss(logits.softmax(dim=-1), logits.argmax(dim=-1, keepdim=True), tau=math.log(4))
    # Every rank computes the same global loss; the trainer sums (averages) it over ranks: scale 2.
    (2 * reference).backward()
    assert reference.item() > 0
    for r, got in enumerate(ranks):
        torch.testing.assert_close(got["loss"], reference.detach())
        torch.testing.assert_close(got["grad"], logits.grad[10 * r : 10 * (r + 1)], rtol=1e-5, atol=1e-7)
