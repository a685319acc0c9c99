"""The demo's comparison table: one row per method with its A-bar, A_B and forgetting."""

import importlib.util

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
