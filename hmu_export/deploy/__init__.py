"""Floor 3: deployment targets: TensorRT recipes and engines, Triton repositories, Kubernetes /
KServe manifests."""
