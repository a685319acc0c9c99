"""The command line: every command documents an example; usage errors exit 2."""

import pytest
from click.testing import CliRunner

from care_export.cli import main


def test_top_level_help_has_example():
    res = CliRunner().invoke(main, ["--help"])
    assert res.exit_code == 0 and "Example" in res.output


@pytest.mark.parametrize("name", sorted(main.commands))
def test_every_command_help_has_example(name):
    res = CliRunner().invoke(main, [name, "--help"])
    assert res.exit_code == 0, res.output
    assert "Example" in res.output and f"care-export {name}" in res.output


def test_bad_usage_exits_2():
    res = CliRunner().invoke(main, ["synth-ckpt", "--tasks", "0", "-o", "x"])
    assert res.exit_code == 2
    res = CliRunner().invoke(main, ["no-such-command"])
    assert res.exit_code == 2
