"""The ``care-export`` command line.

Exit codes: 0 ok, 1 failure (a :class:`~runtime.errors.CareError`, shown as one line), 2 bad usage.
One module per command group beside this file (see ``commands.py``); this file only gathers them.
"""

from __future__ import annotations

import importlib
import sys

import click

from runtime.errors import CareError

TRAIN_EXTRA = {"torch", "torchvision", "timm"}  # what `pip install care-export[train]` adds


class CareGroup(click.Group):
    """Loads each command's module on first use, and shows user errors as one line
    (``error: ...``, exit 1) without a traceback."""

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
        try:
            return super().invoke(ctx)
        except CareError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except ModuleNotFoundError as exc:
            if exc.name not in TRAIN_EXTRA:
                raise
            # The base install is the runtime; this command is on the PyTorch side.
            click.echo(f"error: care-export {ctx.invoked_subcommand} needs {exc.name}, which is not installed: "
                       f"pip install 'care-export[train]'", err=True)
            sys.exit(1)


@click.group(cls=CareGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="care-export")
def main():
    """Train, export and run CaRE continual learners (BR-MoE on a frozen ViT).

    \b
    Example, from nothing to a deployed 301-task artifact:
      care-export synth-ckpt -o ckpt/ --backbone vit_tiny_patch16_224 --tasks 5
      care-export onnx ckpt/ --tasks 301 -o model/
      care-export parity ckpt/ model/
    """
