"""The demo's comparison table: one row per method with its A-bar, A_B and forgetting."""

import importlib.util

import numpy as np
import pytest
from helpers import ROOT

from care_export.training.evaluate import Metrics


def load_demo():
    path = ROOT / "examples" / "demo.py"
    spec = importlib.util.spec_from_file_location("demo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_comparison_table_rows():
    demo = load_demo()
    care = Metrics([80.0, 70.0], [[80.0], [60.0, 80.0]])
    frozen = Metrics([50.0, 45.0], [[50.0], [45.0, 45.0]])
    lines = demo.comparison_table([("CaRE M=2, K=3", care), ("frozen backbone", frozen)]).splitlines()
    assert lines[0].split() == ["method", "A-bar", "A_B", "forgetting"]
    assert lines[1].split()[-3:] == ["75.00", "70.00", f"{care.forgetting:.2f}"] and care.forgetting == 20.0
    assert lines[2].split()[-3:] == ["47.50", "45.00", "5.00"]


def test_shifted_demo_parity_accepts_a_flip_only_at_a_near_tie(monkeypatch, capsys):
    """The demo's parity on builtin-shift passes a routing flip only where the FP32 graph's own
    deciding gap on that input is within NEAR_TIE, and holds the other inputs to atol; a flip at a
    clear margin fails, and on the default sequence any flip does."""
    demo = load_demo()
    tiny = ROOT / "tests" / "data" / "tiny"
    gaps = demo.near_tie_gaps(tiny / "artifact", 8)
    assert gaps.shape == (8,) and (gaps > demo.NEAR_TIE).all(), "random inputs of the tiny model: clear margins"

    from care_export.export.parity import compare

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((8, 5)).astype(np.float32)
    tasks = np.tile(np.array([[0, 1], [1, 2]]), (8, 1, 1))  # (N, L=2, M=2)
    experts = tasks[..., None]  # K = 1
    other = tasks.copy()
    other[3, 0] = [0, 2]  # sample 3 routed otherwise in block 0, its logits with it
    moved = logits.copy()
    moved[3] += 0.5
    flipped = compare((logits, tasks, experts), (moved, other, other[..., None]), atol=1e-4)
    assert flipped.mismatched == [3] and not flipped.ok
    monkeypatch.setattr(demo, "run_parity", lambda *a, **k: flipped)
    monkeypatch.setattr(demo, "near_tie_gaps", lambda art, n: np.where(np.arange(n) == 3, 1e-7, 1.0))
    demo.parity(tiny / "ckpt", tiny / "artifact", demo.NEAR_TIES["builtin-shift"])
    assert "near-tie" in capsys.readouterr().out
    monkeypatch.setattr(demo, "near_tie_gaps", lambda art, n: np.ones(n))
    with pytest.raises(SystemExit, match="from a tie"):
        demo.parity(tiny / "ckpt", tiny / "artifact", demo.NEAR_TIES["builtin-shift"])
    monkeypatch.setattr(demo, "near_tie_gaps", lambda art, n: np.where(np.arange(n) == 3, 1e-7, 1.0))
    moved[0, 1] += 1e-3  # an input routed alike, outside atol
    off = compare((logits, tasks, experts), (moved, other, other[..., None]), atol=1e-4)
    monkeypatch.setattr(demo, "run_parity", lambda *a, **k: off)
    with pytest.raises(SystemExit, match="routed alike exceeds atol"):
        demo.parity(tiny / "ckpt", tiny / "artifact", demo.NEAR_TIES["builtin-shift"])
    with pytest.raises(Exception, match="routing differs"):
        demo.parity(tiny / "ckpt", tiny / "artifact", demo.NEAR_TIES["builtin"])
