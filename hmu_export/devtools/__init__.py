"""Floor 5: developer tools (the GPU device check, the layer checker)."""
