"""Float32 ``x @ W.T + b`` on CPU through oneDNN for large products whose weight is not trained.

PyTorch multiplies float32 matrices on CPU with its BLAS (MKL), which on some processors (AMD
EPYC here) takes a slower path: oneDNN, built into PyTorch, returned the same values (bit for bit
on this machine) in about half the time for classifier alignment's two products over every class
(80 x 192 by 192 x 1000: 164 -> 84 and 153 -> 117 us; ``benchmarks/bench_cpu_linear.py``), and
the frozen backbone's products in training, equal to float rounding (a ViT-B/16 MLP at batch 4,
788 x 768 by 768 x 3072: 20.2 -> 9.1 ms forward, 19.7 -> 10.9 ms the input's gradient; the
built-in ViT's at batch 16: 426 -> 217 and 410 -> 191 us). Its call costs 10-15 us more, so small
products, where BLAS is as fast or faster (below about 4 million multiply-adds here), keep BLAS.

The frozen backbone's linear layers are :class:`Linear` (:func:`use_for`) and take this path
wherever autograd records. From the second block on their input needs a gradient (the experts of
the blocks before are trained through it), which oneDNN's operator, having no autograd formula,
gets from :class:`_FrozenWeight`: the forward and the input's gradient (``grad @ W``, oneDNN
reading ``W.T`` as a strided view at nearly the contiguous speed, so no transposed copy is kept).
Their forwards without autograd keep PyTorch's product: inference in PyTorch, the reference of
the exported graph's parity, stays what PyTorch computes anywhere, and a routing decision at an
exact tie follows the rounding (the demo's random parity inputs hold some, two choices equal in
float32: with oneDNN there the reference took the other one). A weight or bias that is trained,
other devices and dtypes, autocast (mixed precision), and a PyTorch built without oneDNN use
:func:`torch.nn.functional.linear`.

oneDNN's buffers are sized per shape: a shape that changed at every task grew a 301-task run's
memory by half a gigabyte. Callers whose sizes grow pad them to a multiple of ``ONEDNN_ROWS``
(:func:`padded_rows`); the backbone's shapes are the batch sizes'.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ONEDNN_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
ONEDNN_MIN_MACS = 1 << 22  # multiply-adds from which oneDNN was the faster here
ONEDNN_ROWS = 128


def padded_rows(rows: int, macs_per_row: int) -> int:
    """``rows`` rounded up to a multiple of ``ONEDNN_ROWS`` where a product of ``rows *
    macs_per_row`` multiply-adds goes to oneDNN (so that a growing size meets few shapes),
    ``rows`` otherwise."""
    if not ONEDNN_AVAILABLE or rows * macs_per_row < ONEDNN_MIN_MACS:
        return rows
    return -(-rows // ONEDNN_ROWS) * ONEDNN_ROWS


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _FrozenWeight(torch.autograd.Function):
    """oneDNN's product with the gradient of its input only (weight and bias are not trained)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return _onednn(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return _onednn(grad.contiguous(), weight.t()), None, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` over the last dimension of ``x``."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    rows = x.numel() // max(x.shape[-1], 1)
    grad = torch.is_grad_enabled()
    if (
        not ONEDNN_AVAILABLE
        or rows * weight.numel() < ONEDNN_MIN_MACS
        or any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors)
        or torch.is_autocast_enabled("cpu")  # mixed precision (train --amp): autocast's own product
        or (grad and any(t.requires_grad for t in tensors[1:]))  # a trained weight or bias
    ):
        return F.linear(x, weight, bias)
    x2 = x.reshape(rows, x.shape[-1])
    y = _FrozenWeight.apply(x2, weight, bias) if grad and x.requires_grad else _onednn(x2, weight, bias)
    return y.reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """An ``nn.Linear`` that multiplies through :func:`linear` where autograd records (training:
    the first block's input needs no gradient yet, the later ones do); its forwards without
    autograd (evaluation, class statistics, the parity reference) are PyTorch's own product."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def use_for(module: nn.Module) -> None:
    """Make every plain ``nn.Linear`` in ``module`` a :class:`Linear` (parameters, state dict
    and hooks unchanged: only the class, so only ``forward``, changes)."""
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = Linear
