"""Deciding gaps of routing TopKs and margin-aware flip rates (calibration/margins.py)."""

import numpy as np

from calibration.margins import flip_rates, topk_gap


class Ref:
    """A reference with given canonical routing and gaps (one block)."""

    def __init__(self, tasks, experts, task_gap, expert_gap):
        self.tasks, self.experts = np.array(tasks), np.array(experts)
        self.task_gap, self.expert_gap = np.array(task_gap, float), np.array(expert_gap, float)


def test_topk_gap_is_the_distance_between_the_last_kept_and_the_first_dropped():
    entropies = np.array([[0.50, 0.10, 0.30, 0.31], [1.0, 1.0, 2.0, np.inf]])
    kept = np.sort(entropies, -1)[:, :2]  # the two lowest (largest=0)
    np.testing.assert_allclose(topk_gap(entropies, kept, largest=False), [0.01, 1.0])
    logits = np.array([[[3.0, 1.0, 2.5, -np.inf]]])
    np.testing.assert_allclose(topk_gap(logits, logits[..., :2], largest=True), [[1.5]])
    # Nothing dropped, or only masked scores on both sides: nothing to decide.
    assert np.isinf(topk_gap(logits, logits, largest=True)).all()
    masked = np.array([[-np.inf, -np.inf, -np.inf]])
    assert np.isinf(topk_gap(masked, masked[:, :1], largest=True)).all()


def test_margin_aware_flips_count_only_decisions_beyond_eps():
    # 4 images, 1 block, M=1 task of K=1 expert.
    ref = Ref(
        tasks=[[[0]], [[1]], [[2]], [[3]]],
        experts=[[[[5]]], [[[5]]], [[[5]]], [[[5]]]],
        task_gap=[[1e-4], [0.1], [0.1], [0.1]],
        expert_gap=[[0.1], [0.1], [1e-5], [0.1]],
    )
    tasks = np.array([[[9]], [[9]], [[2]], [[3]]])  # image 0 (near tie) and 1 (clear) flip tasks
    experts = np.array([[[[5]]], [[[5]]], [[[6]]], [[[5]]]])  # image 2 flips experts at a near tie
    raw, margin = flip_rates(ref, tasks, experts, eps=1e-3)
    np.testing.assert_allclose(raw, [0.75])
    np.testing.assert_allclose(margin, [0.25])  # only image 1
    _, none_excused = flip_rates(ref, tasks, experts, eps=0.0)
    np.testing.assert_allclose(none_excused, raw)
