"""Triton Inference Server: model configs, the repository writer, generation models, client, server."""
