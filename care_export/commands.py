"""Every ``care-export`` subcommand, in the order ``--help`` lists them.

A command's code lives with the work it does; this list is the one place that names them all.
"""

from .checkpoint_cli import import_official_command, info_command, synth_ckpt_command
from .run_cli import run_command
from .train_cli import train_command

COMMANDS = [
    train_command,
    synth_ckpt_command,
    import_official_command,
    info_command,
    run_command,
]
