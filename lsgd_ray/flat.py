"""A model's parameters and floating-point buffers as views of one flat contiguous buffer.

Pulling toward a leader, publishing weights and counting bytes then work on a single tensor.
BatchNorm running statistics are part of the buffer on purpose: they follow the leader with the
same pull as the weights, so a worker's statistics stay consistent with its weights and the
evaluated leader carries its own (the reference code left them unsynchronised).
Integer buffers (``num_batches_tracked``) stay per worker: they only count.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from lsgd_ray.wire import encode as encode  # re-exported: how weights travel


def _float_buffers(model: nn.Module) -> Iterator[tuple[nn.Module, str, torch.Tensor]]:
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.is_floating_point():
                yield module, name, buffer


class FlatState:
    """Re-homes ``model``'s parameters (then float buffers) into ``self.flat``.

    ``self.grad`` is the matching flat gradient for the parameter part (the first
    ``num_params`` elements); each ``p.grad`` is a view of it.
    """

    def __init__(self, model: nn.Module) -> None:
        params = list(model.parameters())
        buffers = list(_float_buffers(model))
        tensors = params + [b for _, _, b in buffers]
        if not tensors:
            raise ValueError("the model has no parameters")
        dtypes = {t.dtype for t in tensors}
        devices = {t.device for t in tensors}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(
                f"all parameters and float buffers must share one dtype and device, got {dtypes} on {devices}"
            )
        dtype, device = dtypes.pop(), devices.pop()
        self.num_params = sum(p.numel() for p in params)
        total = self.num_params + sum(b.numel() for _, _, b in buffers)
        self.flat = torch.empty(total, dtype=dtype, device=device)
        self.grad = torch.zeros(self.num_params, dtype=dtype, device=device)
        offset = 0
        with torch.no_grad():
            for p in params:
                n = p.numel()
                view = self.flat[offset : offset + n].view_as(p)
                view.copy_(p)
                p.data = view
                p.grad = self.grad[offset : offset + n].view_as(p)
                offset += n
            for module, name, b in buffers:
                n = b.numel()
                view = self.flat[offset : offset + n].view_as(b)
                view.copy_(b)
                module._buffers[name] = view
                offset += n

    @property
    def params(self) -> torch.Tensor:
        return self.flat[: self.num_params]

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()

    def zero_grad(self) -> None:
        self.grad.zero_()

    def to_numpy(self, copy: bool = False) -> np.ndarray:
        """The flat weights as NumPy (a view on CPU unless ``copy``; always a host copy from a GPU)."""
        if self.flat.is_cuda:
            return self.flat.detach().cpu().numpy()
        array = self.flat.detach().numpy()
        return array.copy() if copy else array

    def load(self, weights: np.ndarray | torch.Tensor) -> None:
        """Overwrite the flat buffer (parameters and float buffers) with ``weights``."""
        self.flat.copy_(as_tensor(weights), non_blocking=False)


def as_tensor(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A torch view of ``array`` without copying, read-only arrays included.

    Leader weights arrive as read-only views of the object store; they are only ever read.
    """
    if isinstance(array, torch.Tensor):
        return array
    if not array.flags.writeable:
        # torch warns that it cannot protect a read-only array; we never write to it.
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(array)
    return torch.from_numpy(array)


def decode(weights: torch.Tensor) -> torch.Tensor:
    """A torch view of weights as they travelled (``lsgd_ray.wire.encode``): int16 bits seen as
    bfloat16, widened where they are used (on the worker's device)."""
    return weights.view(torch.bfloat16) if weights.dtype == torch.int16 else weights


def flatten_state(model: nn.Module) -> torch.Tensor:
    """The flat vector (parameters then float buffers) of an ordinary model, same order as FlatState."""
    tensors = list(model.parameters()) + [b for _, _, b in _float_buffers(model)]
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def load_flat(model: nn.Module, flat: np.ndarray | torch.Tensor) -> nn.Module:
    """Copy a flat vector (as produced by FlatState / flatten_state) into an ordinary model."""
    source = as_tensor(flat)
    tensors = list(model.parameters()) + [b for _, _, b in _float_buffers(model)]
    expected = sum(t.numel() for t in tensors)
    if source.numel() != expected:
        raise ValueError(f"flat weights have {source.numel()} elements, the model needs {expected}")
    offset = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            t.copy_(source[offset : offset + n].view_as(t))
            offset += n
    return model


def all_finite(flat: torch.Tensor) -> bool:
    """Whether every entry is finite, in one read pass with no temporary: the sum is NaN or
    infinite if any entry is (``isfinite(flat).all()`` writes and reads a mask as large as
    ``flat``, measured ~30x slower on 100 MB). Finite float32 entries overflow the sum only
    beyond ~3e38, weights that have diverged anyway."""
    return bool(torch.isfinite(flat.sum()))
