"""Every ``care-export`` subcommand, in the order ``--help`` lists them.

A command's code lives with the work it does; this list is the one place that names them all.
"""

from .checkpoint_cli import import_official_command, info_command, synth_ckpt_command
from .export_bench import bench_command
from .export_cli import add_task_command, onnx_command, parity_command
from .run_cli import run_command
from .train_cli import train_command

COMMANDS = [
    train_command,
    synth_ckpt_command,
    import_official_command,
    info_command,
    onnx_command,
    add_task_command,
    parity_command,
    bench_command,
    run_command,
]
