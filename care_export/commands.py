"""Every ``care-export`` subcommand, in the order ``--help`` lists them: name -> "module:object".

A command's code lives with the work it does; this table is the one place that names them all.
Modules are imported only when their command runs, so that ``care-export run`` (the runtime
alone) never loads PyTorch.
"""

COMMANDS = {
    "train": "train_cli:train_command",
    "synth-ckpt": "checkpoint_cli:synth_ckpt_command",
    "import-official": "checkpoint_cli:import_official_command",
    "info": "checkpoint_cli:info_command",
    "onnx": "export_cli:onnx_command",
    "add-task": "export_cli:add_task_command",
    "parity": "export_cli:parity_command",
    "bench": "export_bench:bench_command",
    "run": "run_cli:run_command",
    "verify": "run_cli:verify_command",
    "eval": "eval_cli:eval_command",
    "triton": "triton_cli:triton_command",
    "quantize": "quantize_cli:quantize_command",
}
