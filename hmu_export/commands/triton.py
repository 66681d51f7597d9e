"""`triton`: write (and optionally smoke-test) a Triton model repository from a build folder."""
from __future__ import annotations

import argparse
from pathlib import Path

from . import ui


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "triton", help="write a Triton model repository (tensorrt_plan, onnxruntime_onnx, python)",
        description="Write a Triton model repository from a build folder. Every config.pbtxt is "
                    "validated against Triton's ModelConfig schema and the I/O contract first.")
    p.add_argument("--artifacts", required=True, type=Path, metavar="DIR",
                   help="build folder holding model.onnx (and model.fp16.plan if built)")
    p.add_argument("--out", type=Path, metavar="REPO",
                   help="repository folder to write (default: DIR/triton)")
    p.add_argument("--onnx-tensorrt", action="store_true",
                   help="add ONNX Runtime's TensorRT accelerator (FP16) to the onnx model "
                        "(GPU hosts)")
    p.add_argument("--max-queue-delay-us", type=int, metavar="US",
                   help="dynamic batching queue delay (default: the build config's)")
    p.add_argument("--instances", type=int, metavar="N",
                   help="instances per model (default: the build config's)")
    p.add_argument("--generation-precisions", metavar="LIST",
                   help="generation models to write, e.g. fp32,int8,int4 or auto (default: the "
                        "build config's [triton] generation_precisions; auto = fp32 plus every "
                        "quantized variant the build shipped)")
    p.add_argument("--smoke", action="store_true",
                   help="then start the bundled tritonserver, load the python model and check "
                        "its answers over HTTP and gRPC against ONNX Runtime")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..core.build_folder import open_build
    from ..core.errors import ConfigError
    from ..core.manifest import OK, StageResult, update_manifest
    from ..deploy.triton.config import TritonOptions
    from ..deploy.triton.repository import repository_from_artifacts

    artifacts: Path = args.artifacts
    from ..core.config import MAX_INSTANCES

    if (args.instances is not None and not 1 <= args.instances <= MAX_INSTANCES) or \
            (args.max_queue_delay_us is not None and args.max_queue_delay_us < 0):
        raise ConfigError(f"--instances must be in [1, {MAX_INSTANCES}] and "
                          "--max-queue-delay-us >= 0")
    opts = None
    precisions = None
    if args.generation_precisions is not None:
        precisions = tuple(v.strip() for v in args.generation_precisions.split(",") if v.strip())
    if (artifacts / "model.onnx").is_file():
        cfg = open_build(artifacts).cfg
        if precisions is not None:  # checked as the config key is, naming the flag
            import dataclasses

            try:
                dataclasses.replace(cfg.triton, generation_precisions=precisions).validate(
                    cfg.int8)
            except ConfigError as exc:
                raise ConfigError(str(exc).replace("triton.generation_precisions",
                                                   "--generation-precisions")) from None
        opts = TritonOptions(
            max_queue_delay_us=(cfg.triton.max_queue_delay_us if args.max_queue_delay_us is None
                                else args.max_queue_delay_us),
            instance_count=cfg.triton.instance_count if args.instances is None
            else args.instances,
            onnx_tensorrt_accelerator=args.onnx_tensorrt)
    res = repository_from_artifacts(artifacts, args.out, opts, precisions=precisions)
    rows = [(kind, name, "yes" if kind != "tensorrt" or res.plan_included else
             "config only (no plan built here)") for kind, name in res.models.items()]
    ui.out.print(ui.table(f"Triton repository {res.root}", ["backend", "model", "ready to load"],
                          rows))
    inside = res.root.resolve().is_relative_to(artifacts.resolve())
    if inside and (artifacts / "manifest.json").is_file():
        update_manifest(artifacts, "triton", StageResult(OK, details={
            "models": res.models, "plan_included": res.plan_included,
            "generation_precisions": res.generation_precisions,
            "validated": "schema+semantic", **({"notes": res.notes} if res.notes else {})}),
            written=[res.root])
    for note in res.notes:
        ui.err.print(f"note: {note}")
    if args.smoke:
        if "python" not in res.models:  # the bundled tritonserver serves python models only
            from ..core.errors import BackendUnavailable
            why = next((n for n in res.notes if n.startswith("no python model")),
                       "no python model")
            raise BackendUnavailable(f"--smoke serves the python model, and this repository "
                                     f"has none ({why})")
        return _smoke(artifacts, res.root, res.models["python"])
    return 0


def _smoke(artifacts: Path, repo: Path, model: str) -> int:
    """Serve the python model for real and compare with ONNX Runtime at a few shapes (the
    graph's own inputs and first output: logits, or class_logits of a classifier)."""
    import numpy as np

    from ..core.build_folder import open_build
    from ..core.errors import ParityFailure
    from ..core.io_contract import AXIS_TO_PROFILE, BATCH
    from ..core.grid import contract_feeds, primary_output
    from ..runners import OnnxRuntimeRunner
    from ..deploy.triton.client import HMUTritonClient
    from ..deploy.triton.server import serve

    build = open_build(artifacts, verify=False)  # verified by run() a moment ago
    cfg, contract = build.cfg, build.contract
    p = cfg.profile
    axes = contract.axes
    out = primary_output(contract)
    shapes = sorted({tuple(1 if a == BATCH and k == 0 else getattr(p, AXIS_TO_PROFILE[a])[k]
                           for a in axes) for k in range(3)})  # min (batch 1), opt, max
    rows, worst = [], 0.0
    ui.err.print(f"starting tritonserver for {model}...")
    with serve(repo, [model]) as server, \
            OnnxRuntimeRunner(artifacts / "model.onnx", contract, [p]) as ref:
        for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
            with HMUTritonClient(url, model, protocol, latent_dim=cfg.model.latent_dim) as c:
                for shape in shapes:
                    feeds = contract_feeds(contract, cfg, dict(zip(axes, shape)),
                                           seed=cfg.parity.seed)
                    got = c.infer_feeds(feeds, outputs=[out])[out]
                    err = float(np.max(np.abs(got - ref.infer(feeds)[out])))
                    worst = max(worst, err)
                    rows.append((protocol, "x".join(map(str, shape)), f"{err:.2e}",
                                 "pass" if err <= cfg.parity.fp32_max_abs else "FAIL"))
    ui.out.print(ui.table(f"Triton smoke test ({model} vs ONNX Runtime)",
                          ["protocol", "x".join(axes), "max abs", "result"], rows))
    if worst > cfg.parity.fp32_max_abs:
        raise ParityFailure(f"served model differs from ONNX Runtime by {worst:.3g} > "
                            f"{cfg.parity.fp32_max_abs:g}")
    return 0
