"""Backends: what runs a graph (PyTorch, ONNX Runtime, TensorRT), behind plain interfaces."""
