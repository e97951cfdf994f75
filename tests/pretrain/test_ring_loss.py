"""The ring loss: 2 (and 3) gloo ranks in ring mode == gather mode == one process on the whole batch.

The feature gradients compared here are the sums over ranks that the ring's accumulators bring
home, so a missing hop (an accumulator that never gets back to its owner, or a rank that does
not add its share) changes them. Three ranks check the ring's direction, which two cannot (there
the left and right neighbours are the same rank).
"""
from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pretrain.losses import ContrastiveLoss, gather_with_grad
from pretrain.losses.chunked import tiled_cross_entropy
from pretrain.losses.ring import ring_cross_entropy, ring_sigmoid_loss
from pretrain.losses.sigmoid import naive_sigmoid_loss
from tests.pretrain.test_chunked_loss import grads
from launch.local import free_port

B, D = 5, 8  # rows per rank, feature width
LOSSES = [("softmax", 0.0), ("softmax", 0.1), ("sigmoid", 0.0)]  # (kind, label smoothing)
WAYS = [("gather", "naive", 3), ("gather", "chunked", 3), ("ring", "chunked", 2), ("ring", "chunked", 64)]  # (mode, impl, tile)


def global_batch(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(world * B, D, generator=g), dim=-1)  # (W*B, D)
    txt = F.normalize(img + 0.7 * torch.randn(world * B, D, generator=g), dim=-1)  # (W*B, D) matched pairs
    return img, txt


def loss_and_grads(loss_fn: ContrastiveLoss, img: torch.Tensor, txt: torch.Tensor) -> dict[str, torch.Tensor]:
    """The loss and the gradients of image features, text features, scale and (sigmoid) bias."""
    img, txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    loss = loss_fn(img, txt, scale)
    loss.backward()
    out = {"loss": loss.detach(), "img": img.grad, "txt": txt.grad, "scale": scale.grad}
    if loss_fn.logit_bias is not None:
        out["bias"] = loss_fn.logit_bias.grad
    return out


def make_loss(kind: str, eps: float, mode: str = "gather", impl: str = "naive", tile: int = 3) -> ContrastiveLoss:
    return ContrastiveLoss(True, eps, impl, tile, kind=kind, mode=mode, init_bias=-2.0)


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # A broken ring deadlocks (a block or accumulator sent where nobody receives): fail instead.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    img, txt = global_batch(world)
    mine = slice(rank * B, (rank + 1) * B)  # this rank's share of the global batch
    results = {}
    for kind, eps in LOSSES:
        for mode, impl, tile in WAYS:
            own = loss_and_grads(make_loss(kind, eps, mode, impl, tile), img[mine], txt[mine])
            # What DeepSpeed does: average the scale and bias gradients (parameters) over ranks; the
            # global loss is the mean of the rank losses, so each feature gradient (already summed
            # over the ranks' losses) is divided by W, and the ranks' rows are concatenated.
            avg = {}
            for name, value in own.items():
                if name in ("img", "txt"):
                    parts = [torch.empty_like(value) for _ in range(world)]
                    dist.all_gather(parts, value)
                    avg[name] = torch.cat(parts) / world  # (W*B, D)
                else:
                    avg[name] = value.clone()
                    dist.all_reduce(avg[name])
                    avg[name] /= world
            results[kind, eps, mode, impl, tile] = {"own": own, "averaged": avg}
    # The ring functions by themselves against their definition on the gathered columns, per rank.
    labels = torch.arange(B) + rank * B  # (B,) positives in the gathered batch
    scale, bias = torch.tensor(10.0), torch.tensor(-2.0)
    results["ce"] = [grads(fn, txt[mine], img[mine], scale) for fn in (
        lambda r, c, s: ring_cross_entropy(r, c, s, 0.1, 2),
        lambda r, c, s: tiled_cross_entropy(r, gather_with_grad(c), s, labels, label_smoothing=0.1, tile=2))]
    results["sigmoid"] = [grads(fn, txt[mine], img[mine], scale, bias) for fn in (
        lambda r, c, s, b: ring_sigmoid_loss(r, c, s, b, 2),
        lambda r, c, s, b: naive_sigmoid_loss(r, gather_with_grad(c), s, b, labels))]
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"{w}ranks")
def ranks(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Every case on W gloo ranks, spawned once per W: each rank's results."""
    world, out = request.param, tmp_path_factory.mktemp("ring")
    mp.spawn(_rank_main, args=(world, free_port(), str(out)), nprocs=world, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == want.keys(), what
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=f"{what}: {name}")


@pytest.mark.parametrize("kind,eps", LOSSES)
def test_ranks_equal_one_process_on_the_whole_batch(ranks: list[dict], kind: str, eps: float) -> None:
    """Gather and ring modes, after DeepSpeed's averaging, against the plain global loss."""
    want = loss_and_grads(make_loss(kind, eps), *global_batch(len(ranks)))
    assert want["scale"].abs() > 0 and want["txt"].abs().min() > 0  # every feature receives a gradient
    for mode, impl, tile in WAYS:
        assert_same(ranks[0][kind, eps, mode, impl, tile]["averaged"], want, f"{mode} {impl} tile={tile}")


@pytest.mark.parametrize("kind,eps", LOSSES)
def test_ring_equals_gather_on_each_rank(ranks: list[dict], kind: str, eps: float) -> None:
    """Before averaging: each rank's loss, its own scale/bias gradient, and its feature gradients
    (sums over both ranks' losses) are the same in ring and gather mode."""
    for rank, results in enumerate(ranks):
        want = results[kind, eps, "gather", "naive", 3]["own"]
        for tile in (2, 64):
            assert_same(results[kind, eps, "ring", "chunked", tile]["own"], want, f"rank {rank} tile={tile}")


@pytest.mark.parametrize("name", ["ce", "sigmoid"])
def test_ring_functions_equal_their_gathered_reference(ranks: list[dict], name: str) -> None:
    """ring_cross_entropy / ring_sigmoid_loss == their definition on the gathered columns."""
    for rank, results in enumerate(ranks):
        (ring, ring_grads), (ref, ref_grads) = results[name]
        torch.testing.assert_close(ring, ref, rtol=1e-5, atol=1e-6, msg=f"rank {rank} loss")
        for part, a, b in zip(("rows", "cols", "scale", "bias"), ring_grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=f"rank {rank} {part}")


@pytest.mark.parametrize("b,tile", [(1, 1), (7, 3), (7, 64)])
def test_one_rank_ring_is_the_local_loss(b: int, tile: int) -> None:
    """World size 1 (no process group): the ring degenerates to the tiled / plain local loss."""
    g = torch.Generator().manual_seed(b)
    rows = F.normalize(torch.randn(b, D, generator=g), dim=-1)
    cols = F.normalize(torch.randn(b, D, generator=g), dim=-1)
    labels, scale, bias = torch.arange(b), torch.tensor(10.0), torch.tensor(-2.0)
    ring, want = grads(lambda r, c, s: ring_cross_entropy(r, c, s, 0.1, tile), rows, cols, scale), \
        grads(lambda r, c, s: tiled_cross_entropy(r, c, s, labels, label_smoothing=0.1), rows, cols, scale)
    ring_sig, want_sig = grads(lambda r, c, s, bb: ring_sigmoid_loss(r, c, s, bb, tile), rows, cols, scale, bias), \
        grads(lambda r, c, s, bb: naive_sigmoid_loss(r, c, s, bb, labels), rows, cols, scale, bias)
    for (got, got_grads), (value, value_grads) in ((ring, want), (ring_sig, want_sig)):
        torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-6)
        for a, c in zip(got_grads, value_grads):
            torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)
