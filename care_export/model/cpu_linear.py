"""Float32 ``x @ W.T + b`` on CPU through oneDNN for large products where no gradient is formed.

PyTorch multiplies float32 matrices on CPU with its BLAS (MKL), which on some processors (AMD
EPYC here) takes a slower path: oneDNN, built into PyTorch, returned the same values (bit for bit
on this machine) in about half the time for classifier alignment's two products over every class
(80 x 192 by 192 x 1000: 164 -> 84 and 153 -> 117 us; ``benchmarks/bench_cpu_linear.py``). Its
call costs 10-15 us more, so small products, where BLAS is as fast or faster (below about 4
million multiply-adds here), keep BLAS.

oneDNN compiles and keeps a kernel for every shape it meets (about half a megabyte each, up to a
thousand of them): a shape that changed at every task grew a 301-task run's memory by half a
gigabyte. Callers whose sizes grow pad them to a multiple of ``ONEDNN_ROWS`` (:func:`padded_rows`).
oneDNN's operator has no autograd formula, and other devices and dtypes keep PyTorch's own:
those cases, and a PyTorch built without oneDNN, use :func:`torch.nn.functional.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` (2-D ``x``)."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if (
        ONEDNN_AVAILABLE
        and x.dim() == 2
        and x.shape[0] * weight.shape[0] * weight.shape[1] >= ONEDNN_MIN_MACS
        and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
    ):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)
