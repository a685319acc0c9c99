"""The runtime ships without PyTorch: importing it must never import torch."""

import pkgutil
import subprocess
import sys

from helpers import BLOCK_TORCH, ROOT

import runtime


def test_runtime_modules_import_without_torch():
    names = ["runtime"] + [f"runtime.{m.name}" for m in pkgutil.walk_packages(runtime.__path__)]
    code = BLOCK_TORCH + "import importlib\n" + "".join(f"importlib.import_module({n!r})\n" for n in names)
    code += "assert sys.modules.get('torch') is None, 'torch was imported'\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
