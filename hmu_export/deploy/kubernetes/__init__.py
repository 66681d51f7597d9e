"""Kubernetes deployment of a Triton repository: KServe InferenceService or Deployment + Service +
HPA, validated offline against the real schemas before anything is written."""
