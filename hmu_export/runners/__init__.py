from .base import Runner
from .onnxruntime_runner import OnnxRuntimeRunner
from .torch_runner import TorchRunner

__all__ = ["Runner", "OnnxRuntimeRunner", "TorchRunner"]
