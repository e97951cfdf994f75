"""The Triton loss kernels equal the plain losses: values and gradients of features, scale and bias.

Without a GPU the kernels run in triton's interpreter on CPU tensors, in a child process (see
tests/pretrain/interpret.py for why).
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from pretrain.losses import ContrastiveLoss
from pretrain.losses.contrastive import naive_cross_entropy
from pretrain.losses.sigmoid import naive_sigmoid_loss
from tests.pretrain.interpret import compiled, interpreted, run_interpreted

BLOCK = 16  # the smallest tile tl.dot takes: keeps the interpreter fast and the sizes below ragged


def test_interpreted_kernels_in_a_child_process() -> None:
    run_interpreted(__file__)


def kernel_fns() -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    """(triton_cross_entropy, triton_sigmoid_loss), imported only where they are used: importing
    triton fixes its mode (see above)."""
    from pretrain.kernels.sigmoid import triton_sigmoid_loss
    from pretrain.kernels.softmax_ce import triton_cross_entropy

    return triton_cross_entropy, triton_sigmoid_loss


def grads(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    inputs = tuple(x.detach().clone().requires_grad_() for x in inputs)
    loss = fn(*inputs)
    return loss.detach(), torch.autograd.grad(loss, inputs)


def features(n: int, m: int, dim: int, seed: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = F.normalize(torch.randn(n, dim, generator=g), dim=-1)  # (n, D)
    cols = F.normalize(torch.randn(m, dim, generator=g), dim=-1)  # (m, D)
    return rows.to(device), cols.to(device)


def assert_same(got: tuple[torch.Tensor, tuple[torch.Tensor, ...]], want: tuple[torch.Tensor, tuple[torch.Tensor, ...]],
                names: tuple[str, ...], rtol: float, atol: float) -> None:
    torch.testing.assert_close(got[0], want[0], rtol=rtol, atol=atol, msg="loss")
    for name, a, b in zip(names, got[1], want[1]):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=name)


# (n, m, D): not block multiples, a single pair, one row; D over several dot chunks (40) and
# over two gradient D slices (100 > 4 * BLOCK).
SIZES = [(7, 13, 40), (13, 7, 100), (33, 33, 8), (1, 1, 3), (1, 9, 5)]


@pytest.mark.parametrize("n,m,dim", SIZES)
@pytest.mark.parametrize("eps", [0.0, 0.1])
@interpreted
def test_cross_entropy_matches_plain(n: int, m: int, dim: int, eps: float) -> None:
    """Row direction alone, and both directions at once (square sizes: columns have labels too)."""
    rows, cols = features(n, m, dim, seed=n * 100 + m)
    scale = torch.tensor(14.3)
    g = torch.Generator().manual_seed(1)
    row_labels = torch.randint(0, m, (n,), generator=g)
    col_labels = torch.randint(0, n, (m,), generator=g)
    for w_row, w_col in [(1.0, 0.0), (0.5, 0.5), (0.0, 1.0)][: 3 if n == m else 1]:
        def loss(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
            return lambda r, c, s: fn(r, c, s, row_labels, col_labels, w_row, w_col, eps, tile=BLOCK)

        got, want = grads(loss(kernel_fns()[0]), rows, cols, scale), grads(loss(naive_cross_entropy), rows, cols, scale)
        assert_same(got, want, ("rows", "cols", "scale"), rtol=1e-5, atol=1e-6)
        if m > 1:  # with one class the loss is constant
            assert got[1][2].abs() > 0  # the temperature learns


@pytest.mark.parametrize("n,m,dim", SIZES)
@interpreted
def test_sigmoid_matches_plain(n: int, m: int, dim: int) -> None:
    rows, cols = features(n, m, dim, seed=n * 100 + m)
    labels = torch.randint(0, m, (n,), generator=torch.Generator().manual_seed(2))
    inputs = (rows, cols, torch.tensor(10.0), torch.tensor(-10.0))  # SigLIP's initial scale and bias
    got = grads(lambda r, c, s, b: kernel_fns()[1](r, c, s, b, labels, tile=BLOCK), *inputs)
    want = grads(lambda r, c, s, b: naive_sigmoid_loss(r, c, s, b, labels), *inputs)
    assert_same(got, want, ("rows", "cols", "scale", "bias"), rtol=1e-5, atol=1e-6)
    assert got[1][3].abs() > 0 and got[1][2].abs() > 0


@interpreted
def test_repeated_captions_and_bf16_inputs() -> None:
    """Duplicate rows and columns (ties between logits) and bf16 features, computed in fp32."""
    img, txt = features(20, 20, 32, seed=0)
    txt[3] = txt[7] = txt[11]  # the same caption three times: three columns tie
    img[5] = img[6]  # and two identical images
    labels = torch.arange(20)
    scale, bias = torch.tensor(20.0), torch.tensor(-5.0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        i, t = img.to(dtype), txt.to(dtype)
        for eps in (0.0, 0.1):
            ce = [grads(lambda r, c, s: fn(r, c, s, labels, labels, 0.5, 0.5, eps, tile=BLOCK), i, t, scale)
                  for fn in (kernel_fns()[0], naive_cross_entropy)]
            assert_same(*ce, ("rows", "cols", "scale"), rtol=tol, atol=tol * 1e-1)
        sig = [grads(lambda r, c, s, b: fn(r, c, s, b, labels, tile=BLOCK), i, t, scale, bias)
               for fn in (kernel_fns()[1], naive_sigmoid_loss)]
        assert_same(*sig, ("rows", "cols", "scale", "bias"), rtol=tol, atol=tol * 1e-1)
        assert ce[0][1][0].dtype == dtype  # grads come back in the input dtype


@pytest.mark.parametrize("kind,local_loss,eps", [("softmax", True, 0.0), ("softmax", False, 0.1), ("sigmoid", True, 0.0)])
@interpreted
def test_contrastive_loss_triton_equals_naive(kind: str, local_loss: bool, eps: float) -> None:
    """Single process: the module picks up the interpreted kernels through its lazy import."""
    img, txt = features(19, 19, 24, seed=3)
    scale = torch.tensor(30.0)
    results = []
    for impl in ("triton", "naive"):
        loss_fn = ContrastiveLoss(local_loss=local_loss, label_smoothing=eps, impl=impl, tile=BLOCK, kind=kind)
        inputs = [x.clone().requires_grad_() for x in (img, txt, scale)]
        loss = loss_fn(*inputs)
        results.append((loss.detach(), torch.autograd.grad(loss, inputs + list(loss_fn.parameters()))))
    assert_same(*results, ("image", "text", "scale", "bias"), rtol=1e-5, atol=1e-6)


@compiled
def test_cpu_tensors_need_the_interpreter() -> None:
    triton_cross_entropy, triton_sigmoid_loss = kernel_fns()
    rows, cols = features(4, 4, 8, seed=0)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        triton_cross_entropy(rows, cols, torch.tensor(1.0), torch.arange(4))
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        triton_sigmoid_loss(rows, cols, torch.tensor(1.0), torch.tensor(0.0), torch.arange(4))


@pytest.mark.gpu
@compiled
def test_kernels_on_gpu_match_plain() -> None:
    """Compiled kernels at a real size: 4096 x 4096 pairs, D = 512, default blocks (two D slices)."""
    triton_cross_entropy, triton_sigmoid_loss = kernel_fns()
    n, dim = 4096, 512
    rows, cols = features(n, n, dim, seed=0, device="cuda")
    labels = torch.arange(n, device="cuda")
    scale, bias = torch.tensor(50.0, device="cuda"), torch.tensor(-10.0, device="cuda")
    for eps in (0.0, 0.1):
        got, want = [grads(lambda r, c, s: fn(r, c, s, labels, labels, 0.5, 0.5, eps), rows, cols, scale)
                     for fn in (triton_cross_entropy, naive_cross_entropy)]
        assert_same(got, want, ("rows", "cols", "scale"), rtol=1e-4, atol=1e-6)
    got, want = [grads(lambda r, c, s, b: fn(r, c, s, b, labels), rows, cols, scale, bias)
                 for fn in (triton_sigmoid_loss, naive_sigmoid_loss)]
    assert_same(got, want, ("rows", "cols", "scale", "bias"), rtol=1e-4, atol=1e-6)


@compiled
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_kernels_compile_for_h100_without_a_gpu(kind: str) -> None:
    """Lowers the real (non-interpreted) kernels at the default blocks (D = 512) to sm_90 binaries,
    so the compiled path is type-checked on machines where the gpu test is skipped."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pretrain.kernels import common

    blocks, flag = common.block_sizes(512), {"softmax": common.SOFTMAX, "sigmoid": common.SIGMOID}[kind]
    shared = {"n_a": "i32", "n_b": "i32", "dim": "i32", "stride_a": "i32", "stride_b": "i32"}
    precision = {"PRECISION": common.DOT_PRECISION}
    reduce_sig = {"a_ptr": "*fp32", "b_ptr": "*fp32", "out_ptr": "*fp32", "scale_ptr": "*fp32", "bias_ptr": "*fp32", **shared}
    reduce_const = {"KIND": flag, "BLOCK_A": blocks.a, "BLOCK_B": blocks.b, "BLOCK_K": blocks.k, **precision}
    grad_sig = {**{p: "*fp32" for p in ("a_ptr", "b_ptr", "lse_a_ptr", "lse_b_ptr", "grad_ptr", "part_x_ptr",
                                        "part_1_ptr", "scale_ptr", "bias_ptr")},
                **shared, "stride_g": "i32", "w_a": "fp32", "w_b": "fp32"}
    grad_const = {"KIND": flag, "USE_A": True, "USE_B": kind == "softmax", "PARTIALS": True, "BLOCK_A": blocks.a,
                  "BLOCK_B": blocks.b, "BLOCK_K": blocks.k, "BLOCK_D": blocks.d, **precision}
    for kernel, signature, constants in ((common._row_reduce_kernel, reduce_sig, reduce_const),
                                         (common._row_grad_kernel, grad_sig, grad_const)):
        signature = {**signature, **{name: "constexpr" for name in constants}}
        binary = triton.compile(ASTSource(kernel, signature, constexprs=constants), target=GPUTarget("cuda", 90, 32))
        assert binary.asm["cubin"], kernel.__name__
