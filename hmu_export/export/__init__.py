"""Floor 2: graphs from a model source: ONNX export, ONNX Runtime optimization, FP16 conversion."""
