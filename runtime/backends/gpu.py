"""Which CUDA GPUs this process can use, read from the driver (``libcuda``) through ctypes.

No CUDA toolkit, no cuda-python and no framework is needed for this: the driver library is
what every CUDA program loads, so its absence means there is no usable GPU.
"""

from __future__ import annotations

import ctypes
import functools

from ..errors import BackendError


@functools.lru_cache(maxsize=1)
def gpu_names() -> tuple[str, ...]:
    """Names of the visible CUDA devices, in device order; empty without a driver or a GPU."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return ()
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return ()
    names: list[str] = []
    for i in range(count.value):
        dev = ctypes.c_int(0)
        buf = ctypes.create_string_buffer(256)
        if cuda.cuDeviceGet(ctypes.byref(dev), i) != 0 or cuda.cuDeviceGetName(buf, 256, dev) != 0:
            return tuple(names)
        names.append(buf.value.decode(errors="replace"))
    return tuple(names)


def parse_device(device: str) -> tuple[str, int]:
    """``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` -> (kind, index)."""
    kind, _, index = str(device).partition(":")
    if kind not in ("auto", "cpu", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
        raise BackendError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
    return kind, int(index or 0)
