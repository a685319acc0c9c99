"""The CaRE runtime: run an exported artifact with ONNX Runtime or TensorRT, without PyTorch.

    from runtime import Session
    session = Session("model/")                 # device="auto": TensorRT EP, CUDA EP, then CPU
    result = session.predict(["cat.jpg"], top_k=5)

Importing this package is cheap: ``Session`` and its backends load numpy, onnx and onnxruntime
(or tensorrt) when first used.
"""

from .errors import ArtifactError, BackendError, CapacityError, CareError, InputError

__all__ = ["Session", "Prediction", "CareError", "ArtifactError", "BackendError", "CapacityError", "InputError"]


def __getattr__(name):
    if name in ("Session", "Prediction"):
        from . import session

        return getattr(session, name)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
