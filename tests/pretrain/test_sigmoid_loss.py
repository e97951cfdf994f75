"""The tiled SigLIP loss equals the plain one: values and gradients of features, scale and bias."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.losses import ContrastiveLoss
from pretrain.losses.sigmoid import naive_sigmoid_loss, tiled_sigmoid_loss
from tests.pretrain.test_chunked_loss import grads

SIZES = [(7, 13, 5), (13, 7, 4), (1, 1, 1), (1, 9, 2), (6, 6, 64), (33, 33, 8)]  # (n, m, tile)


def features(n: int, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = F.normalize(torch.randn(n, 16, generator=g), dim=-1)  # (n, D)
    cols = F.normalize(torch.randn(m, 16, generator=g), dim=-1)  # (m, D)
    return rows, cols, torch.randint(0, m, (n,), generator=g)


@pytest.mark.parametrize("n,m,tile", SIZES)
def test_matches_naive_sigmoid_loss(n: int, m: int, tile: int) -> None:
    """Sizes that are not tile multiples, a single pair, one tile larger than everything."""
    rows, cols, labels = features(n, m, n * 100 + m)
    scale, bias = torch.tensor(10.0), torch.tensor(-3.0)  # bias near the logits: positives and negatives both matter
    want, want_grads = grads(lambda r, c, s, b: naive_sigmoid_loss(r, c, s, b, labels), rows, cols, scale, bias)
    got, got_grads = grads(lambda r, c, s, b: tiled_sigmoid_loss(r, c, s, b, labels, tile), rows, cols, scale, bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for name, a, b in zip(("rows", "cols", "scale", "bias"), got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
        assert a.abs().max() > 0, name  # every input learns, even from a single pair


def test_repeated_captions_repeated_labels_and_bf16_inputs() -> None:
    """Two identical columns (the same caption twice), two rows with the same positive, and bf16
    features, computed in fp32."""
    rows, cols, _ = features(10, 10, 0)
    cols[3] = cols[7]
    labels = torch.arange(10)
    labels[2] = 5
    scale, bias = torch.tensor(20.0), torch.tensor(-5.0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        r, c = rows.to(dtype), cols.to(dtype)
        want, want_grads = grads(lambda r, c, s, b: naive_sigmoid_loss(r, c, s, b, labels), r, c, scale, bias)
        got, got_grads = grads(lambda r, c, s, b: tiled_sigmoid_loss(r, c, s, b, labels, 3), r, c, scale, bias)
        assert got.dtype == torch.float32
        assert got_grads[0].dtype == dtype  # the gradient comes back in the features' dtype
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("local_loss", [True, False])
def test_siglip_loss_chunked_equals_naive(local_loss: bool) -> None:
    """Through ContrastiveLoss(kind=sigmoid), the learnable bias included."""
    rows, _, _ = features(12, 1, 1)
    g = torch.Generator().manual_seed(2)
    img, txt = rows, F.normalize(rows + 0.5 * torch.randn(12, 16, generator=g), dim=-1)  # matched pairs
    scale = torch.tensor(10.0)
    results = []
    for impl in ("naive", "chunked"):
        loss_fn = ContrastiveLoss(local_loss, impl=impl, tile=5, kind="sigmoid", init_bias=-4.0)
        loss, feature_grads = grads(loss_fn, img, txt, scale)
        loss_fn(img, txt, scale).backward()
        results.append((loss, feature_grads, loss_fn.logit_bias.grad))
    (naive, naive_grads, naive_bias), (chunked, chunked_grads, chunked_bias) = results
    torch.testing.assert_close(chunked, naive, rtol=1e-5, atol=1e-6)
    for a, b in zip(chunked_grads, naive_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(chunked_bias, naive_bias, rtol=1e-4, atol=1e-6)
    assert naive_bias.abs() > 0
