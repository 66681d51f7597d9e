"""`deploy`: Kubernetes manifests (KServe InferenceService, or Deployment + Service + HPA) for a
Triton model repository, validated against their schemas before anything is written."""
from __future__ import annotations

import argparse
from pathlib import Path

from . import ui


def _models(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected NAME[,NAME...]")
    return names


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "deploy", help="Kubernetes manifests for a Triton repository (KServe, or Deployment + "
                       "Service + HPA)",
        description="Write Kubernetes manifests that serve a Triton model repository (the "
                    "triton/ folder of a build): a KServe InferenceService, or a Deployment, a "
                    "Service and a HorizontalPodAutoscaler on Triton's queue time. Every "
                    "manifest is validated against its schema (Kubernetes', KServe's CRD) "
                    "before --out is written. docs/deploy.md walks from build to cluster.")
    p.add_argument("--repository", required=True, type=Path, metavar="DIR",
                   help="the Triton model repository (e.g. engines/hmu-default/triton)")
    p.add_argument("--target", required=True, choices=("kserve", "k8s"),
                   help="kserve: InferenceService; k8s: Deployment + Service + HPA")
    p.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="folder for the manifests (new, empty, or an earlier deploy output)")
    p.add_argument("--storage-uri", metavar="URI",
                   help="where the cluster reads the repository: s3://BUCKET/PATH, gs://..., "
                        "pvc://CLAIM/PATH; kserve also https://..., k8s also as://... "
                        "(required, or --pvc)")
    p.add_argument("--pvc", metavar="CLAIM[/PATH]",
                   help="the repository is on this PersistentVolumeClaim (= --storage-uri "
                        "pvc://CLAIM/PATH)")
    p.add_argument("--models", type=_models, metavar="NAME[,NAME...]",
                   help="models to serve (default: every model whose files are there and that "
                        "runs on the chosen device)")
    gpu = p.add_mutually_exclusive_group()
    gpu.add_argument("--gpu", dest="gpu", action="store_true", default=None,
                     help="request a GPU (only with a TensorRT plan or GPU-only model served)")
    gpu.add_argument("--no-gpu", dest="gpu", action="store_false",
                     help="CPU only: no GPU request; GPU-only models are not served")
    p.add_argument("--name", metavar="NAME", help="object name (default: the model's name)")
    p.add_argument("--namespace", metavar="NS", help="namespace (default: kubectl's)")
    p.add_argument("--image", metavar="IMAGE",
                   help="tritonserver image (k8s default: nvcr.io/nvidia/tritonserver:25.01-py3; "
                        "kserve default: the runtime's); its TensorRT must match the plan's")
    p.add_argument("--cpu", default="1", metavar="Q", help="CPU request (default 1)")
    p.add_argument("--memory", metavar="Q",
                   help="memory request and limit (default: estimated from the build)")
    p.add_argument("--min-replicas", type=int, default=1, metavar="N")
    p.add_argument("--max-replicas", type=int, default=4, metavar="N")
    p.add_argument("--queue-target-us", type=int, default=50_000, metavar="US",
                   help="k8s HPA target: mean queue time per request and pod (default 50000)")
    p.add_argument("--cpu-target-percent", type=int, default=80, metavar="P",
                   help="k8s HPA fallback target: CPU utilisation of the request (default 80)")
    p.add_argument("--credentials-secret", metavar="SECRET",
                   help="k8s: Secret whose keys become tritonserver's environment (s3 / as "
                        "credentials, e.g. AWS_ACCESS_KEY_ID)")
    p.add_argument("--service-account", metavar="SA",
                   help="service account of the pods (KServe: the one holding storage secrets)")
    p.add_argument("--adapter-namespace", default="monitoring", metavar="NS",
                   help="k8s: namespace of prometheus-adapter (default monitoring)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..deploy.kubernetes.manifests import DeployOptions, check_options, plan_deploy, write_deploy
    from ..deploy.kubernetes.served import read_repository
    from ..core.errors import ConfigError

    if args.pvc and args.storage_uri:
        raise ConfigError("give --storage-uri or --pvc, not both")
    storage = f"pvc://{args.pvc.strip('/')}" if args.pvc else args.storage_uri
    opts = DeployOptions(
        target=args.target, storage_uri=storage, name=args.name, namespace=args.namespace,
        models=args.models, gpu=args.gpu, image=args.image, cpu=args.cpu, memory=args.memory,
        min_replicas=args.min_replicas, max_replicas=args.max_replicas,
        queue_target_us=args.queue_target_us, cpu_target_percent=args.cpu_target_percent,
        credentials_secret=args.credentials_secret, service_account=args.service_account,
        adapter_namespace=args.adapter_namespace)
    check_options(opts)  # option errors first, before the repository is read
    plan = plan_deploy(read_repository(args.repository), opts)
    checked = write_deploy(plan, args.out)
    memory = opts.memory or plan.memory.quantity
    title = (f"{args.target} manifests in {args.out} ({'GPU' if plan.gpu else 'CPU'}, "
             f"{len(plan.served)} model(s), memory {memory})")
    ui.out.print(ui.table(title, ["file", "validated against"], list(checked.items())))
    ui.out.print(f"next: see {args.out / 'README.md'} (what to kubectl apply)")
    return 0
