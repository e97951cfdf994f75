"""The tiled loss equals the plain one: values and gradients of features and temperature."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.losses import ContrastiveLoss
from pretrain.losses.chunked import tiled_cross_entropy


def plain(rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, row_labels: torch.Tensor,
          col_labels: torch.Tensor | None, w_row: float, w_col: float, eps: float) -> torch.Tensor:
    z = scale * rows.float() @ cols.float().T  # (n, m): what the tiled loss never builds
    loss = w_row * F.cross_entropy(z, row_labels, label_smoothing=eps)
    if w_col:
        loss = loss + w_col * F.cross_entropy(z.T, col_labels, label_smoothing=eps)
    return loss


def grads(fn, *inputs: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    inputs = tuple(x.detach().clone().requires_grad_() for x in inputs)
    loss = fn(*inputs)
    return loss.detach(), torch.autograd.grad(loss, inputs)


SIZES = [(7, 13, 5), (13, 7, 4), (1, 1, 1), (1, 9, 2), (6, 6, 64), (33, 33, 8)]


@pytest.mark.parametrize("n,m,tile,both", [(*s, False) for s in SIZES] + [(*s, True) for s in SIZES if s[0] == s[1]])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_matches_plain_cross_entropy(n: int, m: int, tile: int, eps: float, both: bool) -> None:
    """Sizes that are not tile multiples, a single pair, one tile larger than everything; the
    column direction (both) needs a square matrix."""
    g = torch.Generator().manual_seed(n * 100 + m)
    rows = F.normalize(torch.randn(n, 16, generator=g), dim=-1)
    cols = F.normalize(torch.randn(m, 16, generator=g), dim=-1)
    scale = torch.tensor(14.3)
    row_labels = torch.randint(0, m, (n,), generator=g)
    col_labels = torch.randint(0, n, (m,), generator=g) if both else None
    w_col = 0.5 if both else 0.0

    want, want_grads = grads(lambda r, c, s: plain(r, c, s, row_labels, col_labels, 0.5, w_col, eps), rows, cols, scale)
    got, got_grads = grads(lambda r, c, s: tiled_cross_entropy(r, c, s, row_labels, col_labels, 0.5, w_col, eps, tile),
                           rows, cols, scale)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for name, a, b in zip(("rows", "cols", "scale"), got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    if m > 1:  # with one class the loss is constant
        assert got_grads[2].abs() > 0  # the temperature learns


def test_repeated_captions_and_bf16_inputs() -> None:
    """Duplicate rows (the same caption twice in a batch) and bf16 features, computed in fp32."""
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(10, 32, generator=g), dim=-1)
    txt = F.normalize(torch.randn(10, 32, generator=g), dim=-1)
    txt[3] = txt[7]  # a repeated caption: two columns tie
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        i, t = img.to(dtype), txt.to(dtype)
        labels = torch.arange(10)
        want = plain(i, t, torch.tensor(20.0), labels, labels, 0.5, 0.5, 0.0)
        got = tiled_cross_entropy(i, t, torch.tensor(20.0), labels, labels, 0.5, 0.5, 0.0, tile=3)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("local_loss", [True, False])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_clip_loss_chunked_equals_naive(local_loss: bool, eps: float) -> None:
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(12, 24, generator=g), dim=-1)
    txt = F.normalize(img + 0.5 * torch.randn(12, 24, generator=g), dim=-1)  # matched pairs
    scale = torch.tensor(10.0)
    naive, naive_grads = grads(ContrastiveLoss(local_loss, eps, "naive"), img, txt, scale)
    chunked, chunked_grads = grads(ContrastiveLoss(local_loss, eps, "chunked", tile=5), img, txt, scale)
    torch.testing.assert_close(chunked, naive, rtol=1e-5, atol=1e-6)
    for a, b in zip(chunked_grads, naive_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_column_direction_needs_labels() -> None:
    with pytest.raises(ValueError, match="col_labels"):
        tiled_cross_entropy(torch.randn(2, 4), torch.randn(2, 4), torch.tensor(1.0), torch.arange(2), w_col=0.5)
