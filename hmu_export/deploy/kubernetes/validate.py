"""Offline schema validation of the manifests `deploy` writes: nothing unvalidated reaches --out.

Core kinds go through ``kubernetes-validate`` (Kubernetes' own OpenAPI schemas, strict: unknown
fields are errors) at a pinned Kubernetes version; the InferenceService through KServe's own CRD
schema, shipped in ``schemas/`` with its source recorded there.
"""
from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path
from typing import Any

from ...core.errors import BackendUnavailable, HMUExportError

# The Kubernetes version whose schemas the core kinds must satisfy: a release every supported
# KServe and the GPU operator run on; kubernetes-validate ships its schemas (1.25 .. 1.37).
KUBERNETES_VERSION = "1.32"
KSERVE_VERSION = "v0.20.0"
KSERVE_SCHEMA = (Path(__file__).with_name("schemas")
                 / f"kserve-{KSERVE_VERSION}-inferenceservice-v1beta1.schema.json.gz")
CORE_KINDS = {("apps/v1", "Deployment"), ("v1", "Service"),
              ("autoscaling/v2", "HorizontalPodAutoscaler"), ("v1", "ConfigMap")}
KSERVE_KIND = ("serving.kserve.io/v1beta1", "InferenceService")


class ManifestSchemaError(HMUExportError):
    """A generated manifest fails its schema (a bug here, or a value the user passed)."""


def require_validators() -> None:
    """No manifest is written unvalidated: without the validators, ``deploy`` stops first."""
    try:
        import jsonschema  # noqa: F401
        import kubernetes_validate  # noqa: F401
        import yaml  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailable(f"the Kubernetes schema validators are not installed ({exc.name} "
                                 "missing): install hmu-export[deploy]") from None


def _strict(node: Any) -> Any:
    """The CRD schema with unknown fields refused, as the API server's strict field validation
    (kubectl's default) refuses them: objects that list ``properties`` and neither
    ``additionalProperties`` nor ``x-kubernetes-preserve-unknown-fields``."""
    if isinstance(node, list):
        return [_strict(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=1)
def kserve_schema() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(gzip.decompress(KSERVE_SCHEMA.read_bytes()))
    return _strict(data)


def _where(err: Any) -> str:
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path)
    return path.lstrip(".") or "(top level)"


def validate_object(obj: dict[str, Any], where: str) -> str:
    """Validate one manifest object; return what it was checked against (for the README)."""
    import jsonschema
    import kubernetes_validate

    kind = (obj.get("apiVersion"), obj.get("kind"))
    try:
        if kind in CORE_KINDS:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
            return f"Kubernetes {KUBERNETES_VERSION} schema (kubernetes-validate, strict)"
        if kind == KSERVE_KIND:
            # metadata is the API server's ObjectMeta, which the CRD schema leaves open
            kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap",
                                          "metadata": obj.get("metadata", {})},
                                         KUBERNETES_VERSION, strict=True)
            jsonschema.Draft7Validator(kserve_schema()).validate(obj)
            return f"KServe {KSERVE_VERSION} InferenceService CRD schema (strict)"
    except jsonschema.ValidationError as exc:
        raise ManifestSchemaError(f"{where}: {kind[1]} fails its schema at {_where(exc)}: "
                                  f"{exc.message.splitlines()[0][:300]}") from None
    raise ManifestSchemaError(f"{where}: no schema here for {kind[0]} {kind[1]}")
