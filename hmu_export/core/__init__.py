"""Floor 0: plain data and rules every other floor shares (no torch, no onnxruntime here)."""
