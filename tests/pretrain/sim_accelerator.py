"""A stand-in accelerator on a CPU machine, to catch device-placement bugs without a GPU.

On a GPU, a tensor left on the host where the accelerator's is needed fails in two ways: NCCL's
process group takes CUDA tensors only ("No backend type associated with device type cpu"), and an
op that mixes a CUDA tensor with a CPU tensor of one or more dimensions raises. On a CPU-only
machine every tensor is on the host, so neither can happen and such bugs ship unnoticed.

Inside :func:`sim_accelerator`, ``ACCELERATOR`` (``torch.device("meta")``) plays the GPU: a tensor
moved or created there is a :class:`SimTensor` that reports that device but keeps real CPU data
underneath, so models, autograd, optimizers and gloo collectives compute real values. The two
rules above are enforced for every op:

- a ``c10d`` collective must be handed accelerator tensors only;
- an op may not mix accelerator tensors with host tensors of one or more dimensions (0-dim host
  tensors are allowed as CUDA allows them, as scalars; so are host index tensors in indexing,
  which CUDA copies over itself).

``.cpu()``, ``.item()`` and ``.tolist()`` bring values back to the host as on a GPU; ``.numpy()``
on an accelerator tensor raises, as it does for CUDA tensors.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

ACCELERATOR = torch.device("meta")

# CUDA indexing accepts index tensors on the host (they are copied to the device).
_HOST_INDEX_OK = {"aten::index.Tensor", "aten::index_put_", "aten::index_put", "aten::_index_put_impl_"}


class DeviceMismatch(RuntimeError):
    """What CUDA/NCCL would have raised on a GPU."""


class SimTensor(torch.Tensor):
    """Real CPU data (``inner``) that reports itself as living on ``ACCELERATOR``."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> "SimTensor":
        return torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls, inner.size(), strides=inner.stride(), storage_offset=inner.storage_offset(),
            dtype=inner.dtype, device=ACCELERATOR, requires_grad=inner.requires_grad)

    def __init__(self, inner: torch.Tensor) -> None:
        self.inner = inner

    def __repr__(self) -> str:  # type: ignore[override]
        return f"SimTensor({self.inner!r})"

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return NotImplemented  # handled by _Dispatch (the mode), which is always active around these


def _on_accelerator(device: Any) -> bool:
    return device is not None and torch.device(device).type == ACCELERATOR.type


class _Dispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {})
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        sim = [t for t in tensors if isinstance(t, SimTensor)]
        host = [t for t in tensors if not isinstance(t, SimTensor)]
        name = func.name()
        if name.startswith("c10d::"):
            if host:
                shapes = ", ".join(str(tuple(t.shape)) for t in host)
                raise DeviceMismatch(f"{name}: host tensor(s) {shapes} handed to a collective of the accelerator's "
                                     "process group (NCCL: 'No backend type associated with device type cpu')")
        elif sim and name not in _HOST_INDEX_OK and any(t.dim() > 0 for t in host):
            shapes = ", ".join(str(tuple(t.shape)) for t in host if t.dim() > 0)
            raise DeviceMismatch(f"{name}: expected all tensors on the same device, found the accelerator and "
                                 f"host tensor(s) {shapes}")
        to_accelerator = bool(sim)
        if kwargs.get("device") is not None:  # factories and copies say where their result goes
            to_accelerator = _on_accelerator(kwargs["device"])
            if to_accelerator:
                kwargs["device"] = torch.device("cpu")
        wrapper_of = {id(t.inner): t for t in sim}  # in-place ops return their (wrapped) input
        unwrap = lambda x: x.inner if isinstance(x, SimTensor) else x  # noqa: E731
        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))

        def wrap(x: Any) -> Any:
            if isinstance(x, torch.Tensor) and not isinstance(x, SimTensor):
                if id(x) in wrapper_of:
                    return wrapper_of[id(x)]
                return SimTensor(x) if to_accelerator else x
            return x

        # Wrappers made under inference_mode would be inference tensors, and a view op's wrapper
        # must share its base's version counter, which inference tensors refuse.
        with torch.inference_mode(False):
            return tree_map(wrap, out)


class _Constructors(TorchFunctionMode):
    """``torch.tensor(data, device=...)`` and friends build their result without an op the
    dispatch mode sees: build on the host, then move (which it does see)."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.tolist and isinstance(args[0], SimTensor):
            return args[0].inner.tolist()  # allowed on CUDA tensors: a copy to the host
        if func in _device_constructors() and _on_accelerator(kwargs.get("device")):
            kwargs["device"] = "cpu"
            return func(*args, **kwargs).to(ACCELERATOR)
        return func(*args, **kwargs)


@contextlib.contextmanager
def sim_accelerator() -> Iterator[torch.device]:
    """Run the body with ``ACCELERATOR`` standing in for a GPU (yielded)."""
    with _Constructors(), _Dispatch():
        yield ACCELERATOR
