"""The ``care-export`` command line.

Exit codes: 0 ok, 1 failure (a :class:`~runtime.errors.CareError`, shown as one line), 2 bad usage.
One module per command group beside this file (see ``commands.py``); this file only gathers them.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import click

from runtime.errors import CareError

from .log import command_logging, error

TRAIN_EXTRA = {"torch", "torchvision", "timm"}  # what `pip install care-export[train]` adds


class CareGroup(click.Group):
    """Loads each command's module on first use, sets up logging for the command (``log.py``),
    and shows user errors as one line (``error: ...``, exit 1) without a traceback."""

    def list_commands(self, ctx):
        from .commands import COMMANDS

        return list(COMMANDS)

    def get_command(self, ctx, name):
        from .commands import COMMANDS

        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(f"{__package__}.{module}"), attr)

    def invoke(self, ctx):
        p = ctx.params
        if p["verbose"] and p["quiet"]:
            raise click.UsageError("give -v or -q, not both")
        with command_logging(p["verbose"], p["quiet"], p["log_file"]):
            try:
                return super().invoke(ctx)
            except CareError as exc:
                error(str(exc))
                sys.exit(1)
            except ModuleNotFoundError as exc:
                if exc.name not in TRAIN_EXTRA:
                    raise
                # The base install is the runtime; this command is on the PyTorch side.
                error(
                    f"care-export {ctx.invoked_subcommand} needs {exc.name}, which is not installed: "
                    f"pip install 'care-export[train]'"
                )
                sys.exit(1)


@click.group(cls=CareGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="care-export")
@click.option("-v", "--verbose", count=True, help="Also show debug lines (per-epoch training summaries, timings).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr (no progress lines, no hints).")
@click.option(
    "--log-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write every log line (debug included, no progress bars) and the results to FILE.",
)
def main(verbose, quiet, log_file):
    """Train, export and run CaRE continual learners (BR-MoE on a frozen ViT).

    Results go to stdout, log lines (progress, per-task summaries, "next:" hints) to stderr;
    progress bars are drawn only on a terminal. Options before the command:
    care-export -v --log-file run.log train ...

    \b
    Example, from nothing to a deployed 301-task artifact:
      care-export synth-ckpt -o ckpt/ --backbone vit_tiny_patch16_224 --tasks 5
      care-export onnx ckpt/ --tasks 301 -o model/
      care-export parity ckpt/ model/
    """
