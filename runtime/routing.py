"""Routing decisions in one canonical form, for comparing two implementations.

A graph reports, per block, the selected tasks ``(B, L, M)`` and the experts each of them kept
``(B, L, M, K)``, ``-1`` where nothing was selected, in whatever order its TopKs produced. The
canonical form sorts tasks ascending (``-1`` last), carries each task's experts along, and sorts
those ascending (``-1`` last), so that equal decisions give equal arrays.
"""

from __future__ import annotations

import numpy as np

_LAST = np.iinfo(np.int64).max


def _sort_invalid_last(a: np.ndarray, axis: int = -1) -> np.ndarray:
    key = np.where(a < 0, _LAST, a)
    key = np.sort(key, axis=axis)
    return np.where(key == _LAST, -1, key)


def canonical_routing(tasks: np.ndarray, experts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(tasks (..., M), experts (..., M, K))`` in canonical order (see the module doc)."""
    tasks, experts = np.asarray(tasks, np.int64), np.asarray(experts, np.int64)
    order = np.argsort(np.where(tasks < 0, _LAST, tasks), axis=-1, kind="stable")
    tasks = np.take_along_axis(tasks, order, -1)
    experts = np.take_along_axis(experts, order[..., None], -2)
    experts = np.where(tasks[..., None] < 0, -1, experts)
    return tasks, _sort_invalid_last(experts)


def same_routing(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Per sample and block ``(N, L)``: whether two routings ``(tasks, experts)`` select the same
    tasks and keep the same experts (both in canonical form)."""
    (ta, ea), (tb, eb) = a, b
    return (ta == tb).all(-1) & (ea == eb).all((-1, -2))


def pad_routing(tasks: np.ndarray, experts: np.ndarray, m: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad ``tasks (..., m')`` and ``experts (..., m', k')`` with ``-1`` to ``m`` tasks of ``k`` experts."""
    tasks, experts = np.asarray(tasks, np.int64), np.asarray(experts, np.int64)
    pt = [(0, 0)] * (tasks.ndim - 1) + [(0, m - tasks.shape[-1])]
    pe = [(0, 0)] * (experts.ndim - 2) + [(0, m - experts.shape[-2]), (0, k - experts.shape[-1])]
    return np.pad(tasks, pt, constant_values=-1), np.pad(experts, pe, constant_values=-1)
