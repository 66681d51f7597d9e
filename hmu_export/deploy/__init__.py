"""Deploying a Triton model repository to a cluster: KServe or plain Kubernetes manifests,
validated offline against the real schemas before they are written (`deploy` command)."""
