"""Every ``care-export`` subcommand, in the order ``--help`` lists them: name -> "module:object".

Each command is a click command in a module of ``care_export/cli/`` (the only package that uses
click) that parses options and calls the library code of its room; this table is the one place
that names them all. Modules are imported only when their command runs, so that ``care-export run`` (the runtime
alone) never loads PyTorch.
"""

COMMANDS = {
    "train": "train:train_command",
    "synth-ckpt": "checkpoint:synth_ckpt_command",
    "import-official": "checkpoint:import_official_command",
    "info": "info:info_command",
    "onnx": "export:onnx_command",
    "add-task": "export:add_task_command",
    "parity": "export:parity_command",
    "bench": "bench:bench_command",
    "run": "run:run_command",
    "verify": "run:verify_command",
    "eval": "eval:eval_command",
    "plot": "plot:plot_command",
    "triton": "triton:triton_command",
    "quantize": "quantize:quantize_command",
}
