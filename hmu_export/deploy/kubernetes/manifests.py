"""Kubernetes manifests for a Triton model repository: a KServe InferenceService, or a plain
Deployment + Service + HorizontalPodAutoscaler (with the prometheus-adapter rule its queue-time
metric needs).

Everything the manifests say is derived from the repository (which models load, which need a
GPU, how much memory they take) and a few options; contradictions between the two are one-line
errors before anything is written. All files are rendered into a staging folder, read back,
validated against their schemas (validate.py), and only then renamed into ``--out``.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...core.errors import ArtifactError, ConfigError
from .served import RepoModel, Repository
from .resources import MemoryEstimate, estimate_pod_memory

KSERVE, K8S = "kserve", "k8s"
TARGETS = (KSERVE, K8S)
# The NGC image whose TensorRT must match the plan's: choose the plan's with --image.
DEFAULT_IMAGE = "nvcr.io/nvidia/tritonserver:25.01-py3"
HTTP, GRPC, METRICS = 8000, 8001, 8002
KSERVE_HTTP = 8080  # kserve-tritonserver runtime: --http-port=8080 (Knative's user port)
MODEL_DIR = "/models"
# Storage each target can read. k8s: a PVC is mounted; s3/gs/as are read by tritonserver itself.
SCHEMES = {KSERVE: ("s3", "gs", "pvc", "https", "http", "hdfs", "webhdfs", "oci"),
           K8S: ("pvc", "s3", "gs", "as")}
QUEUE_METRIC = "nv_inference_queue_duration_us"  # Triton's cumulative queue time per model
HPA_METRIC = QUEUE_METRIC + "_per_request"  # what the adapter rule exposes: mean queue us/request
SHM_MIB = 256  # memory-backed /dev/shm for python-backend instances (k8s gives 64 MiB)
README_TITLE = "# Kubernetes manifests for "
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUANTITY = re.compile(r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[mkMGTPE])?$")
#: the characters of an image reference (registry/path:tag@digest): no spaces or controls,
#: which the schemas let through and the kubelet refuses only when it pulls (InvalidImageName)
_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,511}$")
MAX_NAME = 40  # KServe / Knative append "-predictor-00001-deployment-<hash>" within 63


@dataclass(frozen=True)
class DeployOptions:
    """What `deploy` is asked for; None means "derive it from the repository"."""

    target: str
    storage_uri: str | None = None  # where the cluster reads the repository from
    name: str | None = None  # object name (default: the build's model name, DNS-safe)
    namespace: str | None = None  # default: kubectl's current namespace
    models: tuple[str, ...] | None = None  # default: every model that loads on the device
    gpu: bool | None = None  # default: GPU iff a served model needs one
    image: str | None = None  # default: DEFAULT_IMAGE (k8s), the runtime's (kserve)
    cpu: str = "1"
    memory: str | None = None  # default: the estimate (resources.py)
    min_replicas: int = 1
    max_replicas: int = 4
    queue_target_us: int = 50_000  # HPA target: mean queue time per request, per pod
    cpu_target_percent: int = 80
    credentials_secret: str | None = None  # k8s: env of s3 / as credentials (envFrom)
    service_account: str | None = None
    adapter_namespace: str = "monitoring"


@dataclass
class DeployPlan:
    """What will be deployed, and why (the README states all of it)."""

    repo: Repository
    opts: DeployOptions
    name: str
    served: list[RepoModel]
    gpu: bool
    memory: MemoryEstimate
    skipped: dict[str, str] = field(default_factory=dict)  # model -> why it is not served

    @property
    def python(self) -> bool:
        return any(m.backend == "python" for m in self.served)


# ----------------------------------------------------------------------------- planning

def _dns_name(base: str) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", base.lower()).strip("-")[:MAX_NAME].strip("-")
    return name if name[:1].isalpha() else f"hmu-{name}".strip("-")[:MAX_NAME]


def check_options(opts: DeployOptions) -> None:
    if opts.target not in TARGETS:
        raise ConfigError(f"--target must be one of {', '.join(TARGETS)}, got {opts.target!r}")
    if not opts.storage_uri:
        how = ("s3://BUCKET/PATH, gs://..., pvc://CLAIM/PATH, https://..." if opts.target == KSERVE
               else "pvc://CLAIM/PATH (or --pvc CLAIM), s3://BUCKET/PATH, gs://..., as://...")
        raise ConfigError(f"--target {opts.target} needs --storage-uri: where the cluster reads "
                          f"the model repository from ({how})")
    scheme, sep, rest = opts.storage_uri.partition("://")
    if not sep or scheme not in SCHEMES[opts.target] or not rest.strip("/"):
        raise ConfigError(f"--storage-uri {opts.storage_uri!r}: --target {opts.target} reads "
                          f"{', '.join(s + '://' for s in SCHEMES[opts.target])} URIs")
    if scheme == "pvc":
        claim, _, sub = rest.partition("/")
        if not _DNS1123.match(claim) or ".." in sub.split("/"):
            raise ConfigError(f"--storage-uri {opts.storage_uri!r}: pvc://CLAIM[/PATH] needs a "
                              "lower-case claim name and a path without '..'")
    if opts.name is not None and (len(opts.name) > MAX_NAME or not _DNS1035.match(opts.name)):
        raise ConfigError(f"--name {opts.name!r} must be 1-{MAX_NAME} lower-case letters, digits "
                          "and '-', starting with a letter")
    for flag, value in (("--namespace", opts.namespace), ("--adapter-namespace",
                                                          opts.adapter_namespace),
                        ("--credentials-secret", opts.credentials_secret),
                        ("--service-account", opts.service_account)):
        if value is not None and (len(value) > 63 or not _DNS1123.match(value)):
            raise ConfigError(f"{flag} {value!r} is not a Kubernetes name")
    if opts.image and not _IMAGE.match(opts.image):
        raise ConfigError(f"--image {opts.image[:80]!r} is not an image reference "
                          "(REGISTRY/PATH:TAG, no spaces)")
    for flag, value in (("--cpu", opts.cpu), ("--memory", opts.memory)):
        if value is not None and not _QUANTITY.match(value):
            raise ConfigError(f"{flag} {value!r} is not a Kubernetes quantity (e.g. 2, 500m, "
                              "4Gi)")
    if not 1 <= opts.min_replicas <= opts.max_replicas:
        raise ConfigError(f"replicas: need 1 <= --min-replicas ({opts.min_replicas}) <= "
                          f"--max-replicas ({opts.max_replicas})")
    if opts.queue_target_us < 1 or not 1 <= opts.cpu_target_percent <= 100:
        raise ConfigError("--queue-target-us must be >= 1 and --cpu-target-percent in 1..100")
    if opts.credentials_secret and opts.target != K8S:
        raise ConfigError("--credentials-secret is for --target k8s (KServe reads credentials "
                          "from --service-account's secrets)")


def _describe(models: list[RepoModel]) -> str:
    """The models with the verb that agrees with them: "a (python), b (onnxruntime) run"."""
    return ", ".join(f"{m.name} ({m.backend})" for m in models) + (" runs" if len(models) == 1
                                                                   else " run")


def plan_deploy(repo: Repository, opts: DeployOptions) -> DeployPlan:
    """Which models to serve on which device, or a ConfigError naming the contradiction."""
    check_options(opts)
    skipped: dict[str, str] = {}
    if opts.models:
        unknown = [n for n in opts.models if n not in repo.models]
        if unknown:
            raise ConfigError(f"--models: {', '.join(unknown)} not in {repo.root} (it has "
                              f"{', '.join(repo.models)})")
        served = [repo.models[n] for n in dict.fromkeys(opts.models)]
        for m in served:
            if not m.loadable:
                hint = (" (build the plan on the GPU host, copy it there, then deploy)"
                        if m.backend == "tensorrt" else "")
                raise ConfigError(f"--models: {m.name} cannot load: {m.missing} in "
                                  f"{repo.root / m.name}{hint}")
        need = [m for m in served if m.needs_gpu]
        gpu = bool(need) if opts.gpu is None else opts.gpu
        if gpu and not need:
            raise ConfigError(f"--gpu, but no selected model needs a GPU: {_describe(served)} "
                              "on the CPU (a GPU is requested only for TensorRT plans and "
                              "GPU-only instances); drop --gpu")
        if not gpu and need:
            gpu_names = ", ".join(m.name for m in need)
            raise ConfigError(f"--no-gpu, but {gpu_names} need(s) a GPU (TensorRT plan or GPU-only "
                              "instances); drop --no-gpu or leave it out of --models")
    else:
        loadable = [m for m in repo.models.values() if m.loadable]
        skipped.update({m.name: f"cannot load: {m.missing}" for m in repo.models.values()
                        if not m.loadable})
        need = [m for m in loadable if m.needs_gpu]
        gpu = bool(need) if opts.gpu is None else opts.gpu
        if gpu and not need:
            why = "; ".join(f"{n}: {w}" for n, w in skipped.items())
            raise ConfigError(f"--gpu, but no model here needs a GPU: {_describe(loadable)} "
                              f"on the CPU{f' ({why})' if why else ''}; drop --gpu")
        served = loadable if gpu else [m for m in loadable if not m.needs_gpu]
        skipped.update({m.name: "needs a GPU (--no-gpu)" for m in loadable if m.needs_gpu
                        and not gpu})
        if not served:
            raise ConfigError(f"no model in {repo.root} can be served "
                              f"({'; '.join(f'{n}: {w}' for n, w in skipped.items())})")
    names = {m.name for m in served}
    for m in served:
        absent = [c for c in m.calls if c not in names]
        if absent:
            raise ConfigError(f"{m.name} calls {', '.join(absent)} through BLS (step_backend "
                              "bls): serve them too (--models)")
    name = opts.name or _dns_name(repo.base_name)
    memory = estimate_pod_memory(repo, served, shm_mib=SHM_MIB if any(
        m.backend == "python" for m in served) and opts.target == K8S else 0)
    return DeployPlan(repo, opts, name, served, gpu, memory, skipped)


# ----------------------------------------------------------------------------- objects

def _labels(plan: DeployPlan) -> dict[str, str]:
    return {"app.kubernetes.io/name": plan.name, "app.kubernetes.io/component": "triton",
            "app.kubernetes.io/managed-by": "hmu-export"}


def _meta(plan: DeployPlan, name: str | None = None, namespace: str | None = None
          ) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name or plan.name}
    ns = namespace or plan.opts.namespace
    if ns:
        meta["namespace"] = ns
    meta["labels"] = _labels(plan)
    return meta


def triton_flags(plan: DeployPlan) -> list[str]:
    """Load exactly the served models (explicit mode: a model left out, e.g. a plan without
    a GPU, is never tried), and report ready only when all of them are."""
    return ["--model-control-mode=explicit",
            *[f"--load-model={m.name}" for m in plan.served],
            "--strict-readiness=true", "--allow-metrics=true"]


def _resources(plan: DeployPlan) -> dict[str, Any]:
    memory = plan.opts.memory or plan.memory.quantity
    res: dict[str, Any] = {"requests": {"cpu": plan.opts.cpu, "memory": memory},
                           "limits": {"memory": memory}}
    if plan.gpu:  # extended resources: request = limit, whole devices
        res["requests"]["nvidia.com/gpu"] = "1"
        res["limits"]["nvidia.com/gpu"] = "1"
    return res


def _probe(path: str, port: int | str, period: int, failures: int, delay: int = 0
           ) -> dict[str, Any]:
    probe: dict[str, Any] = {"httpGet": {"path": path, "port": port}, "periodSeconds": period,
                             "failureThreshold": failures, "timeoutSeconds": 5}
    if delay:
        probe["initialDelaySeconds"] = delay
    return probe


GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def inference_service(plan: DeployPlan) -> dict[str, Any]:
    """KServe InferenceService on the kserve-tritonserver runtime (its args come first; ours
    are appended, KServe concatenates them)."""
    o = plan.opts
    model: dict[str, Any] = {
        "modelFormat": {"name": "triton"}, "runtime": "kserve-tritonserver",
        "protocolVersion": "v2", "storageUri": o.storage_uri, "args": triton_flags(plan),
        "resources": _resources(plan),
        # Knative allows readiness and liveness probes on the serving port; no startup probe,
        # so liveness waits for the models to load (initialDelaySeconds).
        "readinessProbe": _probe("/v2/health/ready", KSERVE_HTTP, 5, 3),
        "livenessProbe": _probe("/v2/health/live", KSERVE_HTTP, 10, 6, delay=120),
    }
    if o.image:
        model["image"] = o.image
    predictor: dict[str, Any] = {"minReplicas": o.min_replicas, "maxReplicas": o.max_replicas,
                                 "model": model}
    if o.service_account:
        predictor["serviceAccountName"] = o.service_account
    if plan.gpu:
        predictor["tolerations"] = [GPU_TOLERATION]
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": _meta(plan), "spec": {"predictor": predictor}}


def _storage(plan: DeployPlan) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """(--model-repository, volumes, mounts): a PVC is mounted read-only at /models; s3://,
    gs:// and as:// are read by tritonserver itself (it copies each model locally on load)."""
    uri = plan.opts.storage_uri or ""
    scheme, _, rest = uri.partition("://")
    if scheme != "pvc":
        return uri, [], []
    claim, _, sub = rest.partition("/")
    mount: dict[str, Any] = {"name": "model-repository", "mountPath": MODEL_DIR, "readOnly": True}
    if sub.strip("/"):
        mount["subPath"] = sub.strip("/")
    return MODEL_DIR, [{"name": "model-repository", "persistentVolumeClaim": {
        "claimName": claim, "readOnly": True}}], [mount]


def deployment(plan: DeployPlan) -> dict[str, Any]:
    o = plan.opts
    repo_arg, volumes, mounts = _storage(plan)
    if plan.python:  # python-backend stubs exchange tensors through /dev/shm
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory",
                                                     "sizeLimit": f"{SHM_MIB}Mi"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    container: dict[str, Any] = {
        "name": "tritonserver", "image": o.image or DEFAULT_IMAGE,
        "args": ["tritonserver", f"--model-repository={repo_arg}", f"--http-port={HTTP}",
                 f"--grpc-port={GRPC}", f"--metrics-port={METRICS}", *triton_flags(plan)],
        "ports": [{"name": "http", "containerPort": HTTP}, {"name": "grpc", "containerPort": GRPC},
                  {"name": "metrics", "containerPort": METRICS}],
        "startupProbe": _probe("/v2/health/live", "http", 10, 60),  # up to 10 min to load
        "readinessProbe": _probe("/v2/health/ready", "http", 5, 3),
        "livenessProbe": _probe("/v2/health/live", "http", 10, 3),
        "resources": _resources(plan),
    }
    if o.credentials_secret:
        container["envFrom"] = [{"secretRef": {"name": o.credentials_secret}}]
    if mounts:
        container["volumeMounts"] = mounts
    pod: dict[str, Any] = {"containers": [container]}
    if o.service_account:
        pod["serviceAccountName"] = o.service_account
    if volumes:
        pod["volumes"] = volumes
    if plan.gpu:
        pod["tolerations"] = [GPU_TOLERATION]
    selector = {k: v for k, v in _labels(plan).items() if k != "app.kubernetes.io/managed-by"}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(plan),
            "spec": {"replicas": o.min_replicas, "selector": {"matchLabels": selector},
                     "template": {"metadata": {"labels": _labels(plan), "annotations": {
                         "prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS),
                         "prometheus.io/path": "/metrics"}}, "spec": pod}}}


def service(plan: DeployPlan) -> dict[str, Any]:
    selector = {k: v for k, v in _labels(plan).items() if k != "app.kubernetes.io/managed-by"}
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(plan),
            "spec": {"selector": selector, "ports": [
                {"name": "http", "port": HTTP, "targetPort": "http"},
                {"name": "grpc", "port": GRPC, "targetPort": "grpc"},
                {"name": "metrics", "port": METRICS, "targetPort": "metrics"}]}}


def autoscaler(plan: DeployPlan) -> dict[str, Any]:
    """Scale on the mean queue time per request (the adapter rule's metric); CPU utilisation
    as the fallback: the HPA takes the larger proposal, and still scales on CPU while the
    custom metric is unavailable (adapter or Prometheus down)."""
    o = plan.opts
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": _meta(plan),
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment",
                                        "name": plan.name},
                     "minReplicas": o.min_replicas, "maxReplicas": o.max_replicas,
                     "metrics": [
                         {"type": "Pods", "pods": {
                             "metric": {"name": HPA_METRIC},
                             "target": {"type": "AverageValue",
                                        "averageValue": str(o.queue_target_us)}}},
                         {"type": "Resource", "resource": {
                             "name": "cpu", "target": {"type": "Utilization",
                                                       "averageUtilization":
                                                           o.cpu_target_percent}}}]}}


def adapter_rules() -> dict[str, Any]:
    """prometheus-adapter rule: Triton's cumulative queue time over its successful requests,
    per pod, as a rate over 1 minute (µs per request; 0 when idle, not NaN)."""
    window = "[1m]"
    query = (f"sum(rate({QUEUE_METRIC}{{<<.LabelMatchers>>}}{window})) by (<<.GroupBy>>) / "
             f"clamp_min(sum(rate(nv_inference_request_success{{<<.LabelMatchers>>}}{window})) "
             "by (<<.GroupBy>>), 0.001)")
    return {"rules": [{
        "seriesQuery": f'{QUEUE_METRIC}{{namespace!="",pod!=""}}',
        "resources": {"overrides": {"namespace": {"resource": "namespace"},
                                    "pod": {"resource": "pod"}}},
        "name": {"matches": f"^{QUEUE_METRIC}$", "as": HPA_METRIC},
        "metricsQuery": query}]}


def adapter_configmap(plan: DeployPlan) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _meta(plan, f"{plan.name}-adapter-rules", plan.opts.adapter_namespace),
            "data": {"config.yaml": to_yaml(adapter_rules(), width=1 << 16)}}


# ----------------------------------------------------------------------------- files

HEADERS = {
    "inferenceservice.yaml": "KServe InferenceService (kserve-tritonserver runtime, protocol v2).",
    "deployment.yaml": "tritonserver Deployment: the served models, probes, resources.",
    "service.yaml": "ClusterIP Service: HTTP 8000, gRPC 8001, metrics 8002.",
    "hpa.yaml": (f"HorizontalPodAutoscaler: Pods metric {HPA_METRIC} (from Triton's\n"
                 f"{QUEUE_METRIC} through prometheus-adapter-rules.yaml), CPU fallback."),
    "prometheus-adapter-rules.yaml": (
        f"prometheus-adapter rule exposing {HPA_METRIC} (custom.metrics.k8s.io) for hpa.yaml.\n"
        "Apply it in the adapter's namespace and install the adapter with it:\n"
        "  helm upgrade --install prometheus-adapter prometheus-community/prometheus-adapter \\\n"
        "    -n {adapter_ns} --set rules.existing={name}-adapter-rules --set prometheus.url=...\n"
        "or copy the rule under `rules.custom` of an adapter you already run (helm values)."),
}


def manifests(plan: DeployPlan) -> dict[str, dict[str, Any]]:
    """File name -> object, in `kubectl apply` order."""
    if plan.opts.target == KSERVE:
        return {"inferenceservice.yaml": inference_service(plan)}
    return {"prometheus-adapter-rules.yaml": adapter_configmap(plan),
            "deployment.yaml": deployment(plan), "service.yaml": service(plan),
            "hpa.yaml": autoscaler(plan)}


def to_yaml(obj: Any, width: int = 100) -> str:
    """YAML with multi-line strings as literal blocks (the adapter rule stays readable)."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    return yaml.dump(obj, Dumper=Dumper, sort_keys=False, width=width)


def render(filename: str, obj: dict[str, Any], plan: DeployPlan) -> str:
    header = HEADERS[filename].format(name=plan.name, adapter_ns=plan.opts.adapter_namespace)
    head = "\n".join(f"# {line}" for line in header.splitlines())
    return (f"{head}\n# Generated by `python -m hmu_export deploy`; validated before it was "
            f"written.\n---\n{to_yaml(obj)}")


def dockerfile(plan: DeployPlan) -> str:
    """A Triton image with what the python-backend models import (the NGC image has numpy,
    not ONNX Runtime); pinned to the build's versions where the manifest records them."""
    def pin(pkg: str) -> str:
        v = plan.repo.versions.get(pkg)
        return f"{pkg}=={v}" if isinstance(v, str) and v else pkg

    pkgs = [pin("numpy"), pin("onnxruntime")]
    if any(any((plan.repo.root / m.name).glob("[0-9]*/tokenizer")) for m in plan.served
           if m.backend == "python"):
        pkgs += ["transformers", "sentencepiece"]  # text requests decode with the tokenizer
    base = plan.opts.image or DEFAULT_IMAGE
    return (f"# Triton with the Python packages the python-backend models import.\n"
            f"# docker build -t REGISTRY/tritonserver-hmu:TAG . && docker push ...\n"
            f"# then: python -m hmu_export deploy ... --image REGISTRY/tritonserver-hmu:TAG\n"
            f"FROM {base}\nRUN pip install --no-cache-dir {' '.join(pkgs)}\n")


def readme(plan: DeployPlan, files: dict[str, str], checked: dict[str, str]) -> str:
    o, name = plan.opts, plan.name
    ns = f" -n {o.namespace}" if o.namespace else ""
    rows = "\n".join(f"| `{f}` | {files[f]} | {checked[f]} |" for f in files)
    served = "\n".join(f"- `{m.name}` ({m.backend}, {m.instances} instance(s)"
                       f"{', GPU' if m.needs_gpu else ''})" for m in plan.served)
    skipped = "\n".join(f"- `{n}`: {why}" for n, why in plan.skipped.items()) or "- none"
    memory = (f"{o.memory} (--memory; the estimate was {plan.memory.detail})" if o.memory
              else plan.memory.detail)
    if o.target == KSERVE:
        apply = f"kubectl apply{ns} -f inferenceservice.yaml\nkubectl get isvc {name}{ns} -w"
        check = (f"URL=$(kubectl get isvc {name}{ns} -o jsonpath='{{.status.url}}')\n"
                 "curl -s $URL/v2/health/ready -o /dev/null -w '%{http_code}\\n'")
    else:
        apply = (f"kubectl apply -f prometheus-adapter-rules.yaml   # namespace "
                 f"{o.adapter_namespace}\nkubectl apply{ns} -f deployment.yaml -f service.yaml "
                 f"-f hpa.yaml\nkubectl rollout status{ns} deployment/{name}")
        check = (f"kubectl port-forward{ns} service/{name} 8000 8001 &\n"
                 "curl -s localhost:8000/v2/health/ready -o /dev/null -w '%{http_code}\\n'\n"
                 f"kubectl get hpa {name}{ns}")
    image_note = ""
    if plan.python and not o.image:
        image_note = ("\n**Image**: the python-backend models import ONNX Runtime, which the NGC "
                      "image lacks:\nbuild `Dockerfile` (here), push it, and deploy again with "
                      "`--image`.\n")
    return f"""{README_TITLE}`{name}`

Written by `python -m hmu_export deploy --target {o.target}` from the Triton repository
`{plan.repo.root}`, read by the cluster from `{o.storage_uri}`.

| file | object | validated against |
|---|---|---|
{rows}

Apply (in this order):

```bash
{apply}
```

Check readiness:

```bash
{check}
```

Served models (tritonserver --model-control-mode=explicit loads exactly these):
{served}

Not served:
{skipped}

GPU: {"1 x nvidia.com/gpu (a served model is a TensorRT plan or GPU-only)" if plan.gpu else
      "none requested (no served model needs one)"}.
Memory (request = limit): {memory}.
CPU request: {o.cpu}.
{image_note}
Step by step, from build to cluster: docs/deploy.md of hmu-export.
"""


def _check_out(out: Path, repo: Path) -> None:
    """--out is replaced whole: it must be new, empty, or an earlier output of `deploy`."""
    if out.resolve().is_relative_to(repo.resolve()):
        raise ConfigError(f"--out {out} lies inside the model repository {repo}: choose a folder "
                          "outside it (Triton would see it as a model)")
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise ArtifactError(f"--out {out} exists and is not a folder: choose another path")
    readme_path = out / "README.md"
    ours = readme_path.is_file() and readme_path.read_text(errors="replace").startswith(
        README_TITLE)
    if any(out.iterdir()) and not ours:
        raise ArtifactError(f"--out {out} is not empty and not an output of `deploy`: choose a "
                            "new or empty folder (it is replaced as a whole)")


def write_deploy(plan: DeployPlan, out: Path) -> dict[str, str]:
    """Render, read back and validate every file in a staging folder beside ``out``, then swap
    it in; returns file -> what it was validated against. Nothing half-written is ever in
    ``out``: a failure leaves it as it was."""
    import yaml

    from .validate import require_validators, validate_object

    out = Path(out)
    require_validators()
    _check_out(out, plan.repo.root)
    objects = manifests(plan)
    try:
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-",
                                        dir=out.absolute().parent))
    except OSError as exc:
        raise ArtifactError(f"cannot write beside {out}: {exc.strerror or exc}") from None
    old: Path | None = None
    try:
        checked: dict[str, str] = {}
        for filename, obj in objects.items():
            (staging / filename).write_text(render(filename, obj, plan), encoding="utf-8")
            back = yaml.safe_load((staging / filename).read_text(encoding="utf-8"))
            checked[filename] = validate_object(back, filename)  # what is written is checked
        if plan.python and plan.opts.image is None:
            (staging / "Dockerfile").write_text(dockerfile(plan), encoding="utf-8")
            checked["Dockerfile"] = "(not a manifest)"
        kinds = {f: f"{o['kind']} `{o['metadata']['name']}`" for f, o in objects.items()}
        kinds.update({f: "image for the python backend" for f in checked if f not in kinds})
        (staging / "README.md").write_text(readme(plan, kinds, checked), encoding="utf-8")
        os.chmod(staging, 0o777 & ~_umask())
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
        os.rename(staging, out)
    except OSError as exc:
        if old is not None and not out.exists():
            os.rename(old, out)
        raise ArtifactError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        if old is not None and old.exists() and out.exists():
            shutil.rmtree(old, ignore_errors=True)
    return checked


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
