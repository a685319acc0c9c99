"""Float32 ``x @ W.T`` on CPU: PyTorch's BLAS (``F.linear``) against oneDNN's operator, side by
side, with the ratios and which one ``care_export.model.cpu_linear.linear`` takes (oneDNN from
``ONEDNN_MIN_MACS`` multiply-adds):

* alignment forward: 80 pseudo-features by the head's C rows; backward: the head's gradient
  (C x 80 by 80 x D); what ``cpu_linear`` serves;
* the frozen backbone's MLP in training, forward (B*N tokens by D x 4D) and the input's gradient
  (B*N x 4D by the weight read transposed), what ``cpu_linear.Linear`` serves;
* routing, for comparison: a batch's CLS tokens (B x D) by the down projection of E experts of
  rank 16 (D x 16E), which stays on BLAS (its width changes at every task, and oneDNN keeps a
  kernel per shape).

    python benchmarks/bench_cpu_linear.py --threads 2                                   # built-in ViT
    python benchmarks/bench_cpu_linear.py --threads 2 --dim 768 --tokens 788 --rounds 20  # ViT-B/16, batch 4
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from care_export.model.cpu_linear import ONEDNN_AVAILABLE, ONEDNN_MIN_MACS


def median_us(fn, rounds: int) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--batch", type=int, default=16, help="CLS tokens of the routing product")
    ap.add_argument("--tokens", type=int, default=16 * 17, help="tokens of a training batch (B*N)")
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not ONEDNN_AVAILABLE:
        raise SystemExit("this PyTorch has no oneDNN linear operator: cpu_linear uses F.linear throughout")
    onednn = torch.ops.mkldnn._linear_pointwise
    d = args.dim
    cases = []
    for c in (130, 250, 500, 1000):
        g, x = torch.randn(80, c), torch.randn(80, d)
        cases.append((f"align fwd C={c}", x, torch.randn(c, d)))
        cases.append((f"align bwd C={c}", g.T, x.T))
    fc1 = torch.randn(4 * d, d)
    cases.append(("backbone fc1 fwd", torch.randn(args.tokens, d), fc1))
    cases.append(("backbone fc1 grad", torch.randn(args.tokens, 4 * d), fc1.T))
    cases += [(f"routing E={e}", torch.randn(args.batch, d), torch.randn(16 * e, d)) for e in (10, 80, 300)]
    print(f"medians of {args.rounds}, {torch.get_num_threads()} threads; oneDNN from {ONEDNN_MIN_MACS:,} multiply-adds")
    print(f"{'product':>18} {'MACs':>11} {'BLAS us':>8} {'oneDNN us':>10} {'BLAS/oneDNN':>12} {'taken':>7}")
    for name, x, w in cases:
        macs = x.shape[0] * w.shape[0] * w.shape[1]
        blas = median_us(lambda x=x, w=w: F.linear(x, w), args.rounds)
        dnn = median_us(lambda x=x, w=w: onednn(x, w, None, "none", [], ""), args.rounds)
        taken = "BLAS" if name.startswith("routing") or macs < ONEDNN_MIN_MACS else "oneDNN"
        print(f"{name:>18} {macs:>11,} {blas:>8.1f} {dnn:>10.1f} {blas / dnn:>11.2f}x {taken:>7}")


if __name__ == "__main__":
    main()
