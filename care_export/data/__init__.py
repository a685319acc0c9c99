"""Labelled image sources: built-in procedural data, image folders, CIFAR; their task sequences.

The names below are what the command line offers before any data is opened (no PyTorch)."""

DEFAULT_SEED = 1993  # the reference's seed for the class order
BUILTIN_KINDS = ("builtin", "builtin-shift")
INPUT_SETS = ("common", "cifar224", "imageneta", "vtab")  # the reference's input transforms
