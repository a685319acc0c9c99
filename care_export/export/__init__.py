"""The static-graph exporter: checkpoint directory -> artifact directory (see docs/ARTIFACT.md).

``writer`` writes artifacts (single-pass ``graph``, ``iterative_graph``), ``parity`` proves them
against PyTorch, ``bench`` times them."""
