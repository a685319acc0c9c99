"""Fixtures shared by the runtime tests. The PyTorch side is imported inside the fixtures, so this
file also loads where only the runtime is installed (make test-runtime)."""

import pytest
from helpers import SESSION_CAPACITY, SESSION_GROWN, SESSION_TASKS, random_inputs, reference, synth_session_checkpoint


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Checkpoints of 4 and 6 tasks (one sequence), the 4-task artifact at capacity 8, references."""
    from care_export.export.writer import export_artifact

    d = tmp_path_factory.mktemp("session")
    ck, grown = synth_session_checkpoint(d / "ck4", SESSION_TASKS), synth_session_checkpoint(d / "ck6", SESSION_GROWN)
    manifest = export_artifact(ck, d / "art", SESSION_CAPACITY)
    x = random_inputs(48)
    return {
        "dir": d,
        "ck": ck,
        "grown": grown,
        "art": d / "art",
        "x": x,
        "before": reference(ck, x, manifest["brmoe"]),
        "after": reference(grown, x, manifest["brmoe"]),
    }
