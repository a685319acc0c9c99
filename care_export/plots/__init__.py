"""Figures of a run: accuracy after each task (``accuracy``) and benchmark latency against the
number of tasks (``latency``). Headless (matplotlib's Agg/SVG canvases, no display, no pyplot
state); PNG unless the file name ends in .svg. matplotlib is the optional extra ``plot``."""
