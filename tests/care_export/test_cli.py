"""The command line: every command documents an example; usage errors exit 2."""

import pytest
from click.testing import CliRunner

from care_export.cli import main
from care_export.cli.commands import COMMANDS


def test_top_level_help_has_example():
    res = CliRunner().invoke(main, ["--help"])
    assert res.exit_code == 0 and "Example" in res.output


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_help_has_example(name):
    res = CliRunner().invoke(main, [name, "--help"])
    assert res.exit_code == 0, res.output
    assert "Example" in res.output and f"care-export {name}" in res.output


def test_bad_usage_exits_2():
    res = CliRunner().invoke(main, ["synth-ckpt", "--tasks", "0", "-o", "x"])
    assert res.exit_code == 2
    res = CliRunner().invoke(main, ["no-such-command"])
    assert res.exit_code == 2


def test_run_command_does_not_load_torch():
    """``care-export run`` serves machines without PyTorch: the CLI must not import it."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from care_export.cli import main\n"
        "sys.argv = ['care-export', 'run', '--help']\n"
        "main()"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Example" in proc.stdout
