"""`deploy`: Kubernetes / KServe manifests for a Triton repository, validated offline against the
real schemas (kubernetes-validate's Kubernetes schemas, KServe's own InferenceService CRD).

The repository is the tiny SMALL build's (full graph + encoder / decoder: the tensorrt, onnx,
python and four generation models); a fake model.plan stands in for a GPU build's engine (the
manifests only need the file to be there).
"""
from __future__ import annotations

import copy
import gzip
import json
import shutil
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from hmu_export.commands.cli import main
from hmu_export.deploy.kubernetes import manifests as K
from hmu_export.deploy.kubernetes import validate as V
from hmu_export.deploy.kubernetes.served import read_repository
from hmu_export.deploy.kubernetes.resources import MIB, PYTHON_STUB, TRITON_BASE
from hmu_export.core.errors import ConfigError
from hmu_export.core.memory import estimate_memory
from hmu_export.deploy.triton.repository import repository_from_artifacts
from hmu_export.deploy.triton.generation import with_step_backend

TRT, ORT, PY = "hmu-tiny_tensorrt", "hmu-tiny_onnx", "hmu-tiny_python"
GEN, ENC, DEC = "hmu-tiny_generate", "hmu-tiny_encoder", "hmu-tiny_decoder"
CPU_MODELS = {ORT, PY, GEN, "hmu-tiny_generate_stream", ENC, DEC}


@pytest.fixture(scope="module")
def repo(gen_build, tmp_path_factory) -> Path:
    """The tiny build's Triton repository (no plan: a CPU build), inside a copy of the build."""
    build = tmp_path_factory.mktemp("deploy") / "hmu-tiny"
    shutil.copytree(gen_build, build)
    return repository_from_artifacts(build, build / "triton").root


@pytest.fixture()
def gpu_repo(repo, tmp_path) -> Path:
    """The repository with the TensorRT model's plan in place (as on a GPU build)."""
    out = tmp_path / "gpu" / "triton"
    shutil.copytree(repo, out)
    (out / TRT / "1" / "model.plan").write_bytes(b"\0" * 4096)
    return out


def _deploy(repo: Path, out: Path, *extra: str, target: str = "k8s") -> dict[str, Any]:
    storage = ["--pvc", "models/hmu"] if target == "k8s" else ["--storage-uri", "s3://b/hmu"]
    assert main(["deploy", "--repository", str(repo), "--target", target, "--out", str(out),
                 *storage, *extra]) == 0
    return {p.name: yaml.safe_load(p.read_text()) for p in out.glob("*.yaml")}


def _container(objs: dict[str, Any]) -> dict[str, Any]:
    return objs["deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]


def _loaded(args: list[str]) -> set[str]:
    return {a.split("=", 1)[1] for a in args if a.startswith("--load-model=")}


def _kserve_schema() -> dict[str, Any]:
    return json.loads(gzip.decompress(V.KSERVE_SCHEMA.read_bytes()))


# ---------------------------------------------------------------------------- schemas

def test_k8s_manifests_validate_against_kubernetes_schemas(repo, tmp_path):
    out = tmp_path / "k8s"
    objs = _deploy(repo, out)
    assert sorted(objs) == ["deployment.yaml", "hpa.yaml", "prometheus-adapter-rules.yaml",
                            "service.yaml"]
    for obj in objs.values():  # straight through kubernetes-validate, strict, pinned version
        assert kubernetes_validate.validate(obj, V.KUBERNETES_VERSION, strict=True) == \
            V.KUBERNETES_VERSION
    kinds = {o["kind"] for o in objs.values()}
    assert kinds == {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap"}
    readme = (out / "README.md").read_text()
    assert "kubectl apply" in readme and f"Kubernetes {V.KUBERNETES_VERSION}" in readme


def test_kserve_manifest_validates_against_the_crd(repo, gpu_repo, tmp_path):
    for src, out in ((repo, tmp_path / "out-cpu"), (gpu_repo, tmp_path / "out-gpu")):
        objs = _deploy(src, out, target="kserve")
        assert list(objs) == ["inferenceservice.yaml"]
        isvc = objs["inferenceservice.yaml"]
        jsonschema.Draft7Validator(_kserve_schema()).validate(isvc)  # the CRD as shipped
        jsonschema.Draft7Validator(V.kserve_schema()).validate(isvc)  # + unknown fields refused
        model = isvc["spec"]["predictor"]["model"]
        assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1",
                                                      "InferenceService")
        assert model["modelFormat"] == {"name": "triton"}
        assert model["runtime"] == "kserve-tritonserver" and model["protocolVersion"] == "v2"
        assert model["storageUri"] == "s3://b/hmu"
        assert model["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
        assert model["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}
    assert "KServe v0.20.0" in (tmp_path / "out-gpu" / "README.md").read_text()


def test_schemas_reject_what_the_api_server_rejects(repo, tmp_path):
    """The validation can fail: a misspelt field, a missing required one, a bad quantity (the
    CRD has a pattern; Kubernetes' own Quantity schema is a bare string), a wrong type."""
    k8s = _deploy(repo, tmp_path / "k8s")
    isvc = _deploy(repo, tmp_path / "ks", target="kserve")["inferenceservice.yaml"]
    bad_dep = copy.deepcopy(k8s["deployment.yaml"])
    bad_dep["spec"]["template"]["spec"]["containers"][0]["readynessProbe"] = {}
    bad_hpa = copy.deepcopy(k8s["hpa.yaml"])
    del bad_hpa["spec"]["scaleTargetRef"]["name"]
    bad_isvc = copy.deepcopy(isvc)
    bad_isvc["spec"]["predictor"]["model"]["storageURI"] = "s3://typo"
    bad_isvc2 = copy.deepcopy(isvc)
    bad_isvc2["spec"]["predictor"]["minReplicas"] = "one"
    bad_isvc3 = copy.deepcopy(isvc)
    bad_isvc3["spec"]["predictor"]["model"]["resources"]["limits"]["memory"] = "lots"
    for obj in (bad_dep, bad_hpa, bad_isvc, bad_isvc2, bad_isvc3):
        with pytest.raises(V.ManifestSchemaError, match="fails its schema"):
            V.validate_object(obj, "test")


def test_schema_file_is_the_recorded_one():
    import hashlib

    digest = hashlib.sha256(V.KSERVE_SCHEMA.read_bytes()).hexdigest()
    assert digest in (V.KSERVE_SCHEMA.parent / "README.md").read_text()
    schema = _kserve_schema()
    predictor = schema["properties"]["spec"]["properties"]["predictor"]["properties"]
    assert {"storageUri", "protocolVersion", "runtime", "modelFormat"} <= set(
        predictor["model"]["properties"])


# ---------------------------------------------------------------------------- content

def test_cpu_build_requests_no_gpu_and_skips_the_planless_tensorrt_model(repo, tmp_path):
    out = tmp_path / "k8s"
    objs = _deploy(repo, out)
    c = _container(objs)
    assert "nvidia.com/gpu" not in json.dumps(objs)
    assert "tolerations" not in objs["deployment.yaml"]["spec"]["template"]["spec"]
    assert _loaded(c["args"]) == CPU_MODELS
    assert "--model-control-mode=explicit" in c["args"]
    assert c["args"][:2] == ["tritonserver", "--model-repository=/models"]
    assert f"`{TRT}`: cannot load: no 1/model.plan" in (out / "README.md").read_text()
    assert (out / "Dockerfile").is_file()  # python models: the NGC image lacks ONNX Runtime


def test_tensorrt_plan_requests_one_gpu(gpu_repo, tmp_path):
    objs = _deploy(gpu_repo, tmp_path / "out-gpu")
    c = _container(objs)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert _loaded(c["args"]) == CPU_MODELS | {TRT}
    assert objs["deployment.yaml"]["spec"]["template"]["spec"]["tolerations"][0]["key"] == \
        "nvidia.com/gpu"
    cpu = _deploy(gpu_repo, tmp_path / "cpu", "--no-gpu")  # same repository, CPU only
    assert "nvidia.com/gpu" not in json.dumps(cpu)
    assert _loaded(_container(cpu)["args"]) == CPU_MODELS
    only_onnx = _deploy(gpu_repo, tmp_path / "onnx", "--models", f"{ORT},{PY}")
    assert "nvidia.com/gpu" not in json.dumps(only_onnx)
    assert _loaded(_container(only_onnx)["args"]) == {ORT, PY}


def test_probes_ports_and_service(repo, tmp_path):
    objs = _deploy(repo, tmp_path / "k8s")
    c = _container(objs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert c["startupProbe"]["httpGet"]["path"] == "/v2/health/live"
    svc = objs["service.yaml"]["spec"]
    assert {p["port"] for p in svc["ports"]} == {8000, 8001, 8002}
    labels = objs["deployment.yaml"]["spec"]["template"]["metadata"]["labels"]
    assert svc["selector"].items() <= labels.items()
    volumes = {v["name"]: v for v in objs["deployment.yaml"]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["model-repository"]["persistentVolumeClaim"] == {"claimName": "models",
                                                                    "readOnly": True}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"


def test_hpa_scales_on_triton_queue_time_with_cpu_fallback(repo, tmp_path):
    objs = _deploy(repo, tmp_path / "k8s", "--queue-target-us", "20000", "--max-replicas", "6")
    hpa = objs["hpa.yaml"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": "hmu-tiny"}
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (1, 6)
    pods, resource = hpa["metrics"]
    assert pods["type"] == "Pods"
    assert pods["pods"]["metric"]["name"] == "nv_inference_queue_duration_us_per_request"
    assert pods["pods"]["target"] == {"type": "AverageValue", "averageValue": "20000"}
    assert resource["resource"] == {"name": "cpu", "target": {"type": "Utilization",
                                                              "averageUtilization": 80}}
    rules = yaml.safe_load(objs["prometheus-adapter-rules.yaml"]["data"]["config.yaml"])["rules"]
    (rule,) = rules
    assert rule["seriesQuery"].startswith("nv_inference_queue_duration_us{")
    assert rule["name"]["as"] == pods["pods"]["metric"]["name"]  # the HPA reads what it exposes
    assert "rate(nv_inference_queue_duration_us{" in rule["metricsQuery"]
    assert "nv_inference_request_success" in rule["metricsQuery"]
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def test_memory_follows_the_build_estimate(repo, small_cfg, tmp_path):
    r = read_repository(repo)
    assert r.cfg is not None and r.cfg.model.name == "hmu-tiny"
    assert "metadata" in r.cfg_source  # no manifest beside this repository: a graph's metadata
    plan = K.plan_deploy(r, K.DeployOptions(target="kserve", storage_uri="s3://b/p"))
    served = plan.served
    python = sum(m.instances for m in served if m.backend == "python")
    files = 2 * sum(m.bytes * m.instances for m in served)
    want = TRITON_BASE + python * PYTHON_STUB + max(estimate_memory(small_cfg)[0], files)
    assert plan.memory.bytes == -(-want // (64 * MIB)) * 64 * MIB
    objs = _deploy(repo, tmp_path / "m", "--memory", "3Gi")
    assert _container(objs)["resources"]["limits"]["memory"] == "3Gi"


def test_config_from_the_build_manifest(repo, small_cfg, tmp_path):
    build = tmp_path / "build"
    shutil.copytree(repo, build / "triton")
    (build / "manifest.json").write_text(json.dumps({"config": small_cfg.to_dict(),
                                                     "versions": {"onnxruntime": "9.9.9"}}))
    r = read_repository(build / "triton")
    assert "manifest" in r.cfg_source and r.versions["onnxruntime"] == "9.9.9"
    _deploy(build / "triton", tmp_path / "k8s")
    assert "onnxruntime==9.9.9" in (tmp_path / "k8s" / "Dockerfile").read_text()


def test_rerun_replaces_a_previous_output_whole(repo, tmp_path):
    out = tmp_path / "out"
    _deploy(repo, out)
    _deploy(repo, out, target="kserve")
    assert sorted(p.name for p in out.iterdir()) == ["Dockerfile", "README.md",
                                                     "inferenceservice.yaml"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_a_failed_validation_leaves_out_as_it_was(repo, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    _deploy(repo, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def fail(obj, where):
        raise V.ManifestSchemaError(f"{where}: injected")

    monkeypatch.setattr(V, "validate_object", fail)
    assert main(["deploy", "--repository", str(repo), "--target", "kserve", "--out", str(out),
                 "--storage-uri", "s3://b/p"]) == 2
    assert "injected" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bls_generation_models_need_their_targets(repo, tmp_path):
    bls = tmp_path / "triton"
    shutil.copytree(repo, bls)
    conf = bls / GEN / "config.pbtxt"
    conf.write_text(with_step_backend(conf.read_text(), "bls"))
    with pytest.raises(ConfigError, match=f"calls {ENC}, {DEC} through BLS"):
        K.plan_deploy(read_repository(bls), K.DeployOptions(
            target="k8s", storage_uri="pvc://m", models=(GEN,)))
    plan = K.plan_deploy(read_repository(bls), K.DeployOptions(
        target="k8s", storage_uri="pvc://m", models=(GEN, ENC, DEC)))
    assert [m.name for m in plan.served] == [GEN, ENC, DEC]


# ---------------------------------------------------------------------------- bad input

def _fails(capsys, argv: list[str], match: str) -> None:
    assert main(["deploy", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err, err
    assert match in err, err


@pytest.mark.parametrize("what", ["missing", "file", "empty", "foreign", "bad_config"])
def test_not_a_repository_is_one_line(what, tmp_path, capsys):
    src = tmp_path / "src"
    if what == "file":
        src.write_text("x")
    elif what != "missing":
        src.mkdir()
    if what == "foreign":
        (src / "data").mkdir()
        (src / "data" / "notes.txt").write_text("x")
    if what == "bad_config":
        (src / "m").mkdir()
        (src / "m" / "config.pbtxt").write_text("name: 'm'\nmax_batch: 4\n")
    out = tmp_path / "out"
    match = {"missing": "does not exist", "file": "not a folder",
             "empty": "not a Triton model repository", "foreign": "not a Triton model repository",
             "bad_config": "not a Triton model config"}[what]
    _fails(capsys, ["--repository", str(src), "--target", "k8s", "--out", str(out), "--pvc",
                    "m"], match)
    assert not out.exists()


def test_contradictions_are_one_line_and_write_nothing(repo, gpu_repo, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--repository", str(repo), "--out", str(out)]
    _fails(capsys, [*base, "--target", "kserve"], "--target kserve needs --storage-uri")
    _fails(capsys, [*base, "--target", "k8s"], "--target k8s needs --storage-uri")
    _fails(capsys, [*base, "--target", "k8s", "--storage-uri", "ftp://x/y"], "pvc://")
    _fails(capsys, [*base, "--target", "k8s", "--pvc", "m", "--gpu"],
           "--gpu, but no model here needs a GPU")
    _fails(capsys, [*base, "--target", "kserve", "--storage-uri", "s3://b/p", "--gpu",
                    "--models", f"{ORT},{PY}"], "--gpu, but no selected model needs a GPU")
    _fails(capsys, [*base, "--target", "k8s", "--pvc", "m", "--models", TRT],
           f"{TRT} cannot load: no 1/model.plan")
    _fails(capsys, [*base, "--target", "k8s", "--pvc", "m", "--models", "nope"],
           "nope not in")
    _fails(capsys, ["--repository", str(gpu_repo), "--out", str(out), "--target", "k8s",
                    "--pvc", "m", "--no-gpu", "--models", TRT], "--no-gpu, but")
    _fails(capsys, [*base, "--target", "k8s", "--pvc", "m", "--min-replicas", "5"],
           "--min-replicas")
    _fails(capsys, [*base, "--target", "k8s", "--pvc", "m", "--name", "Bad_Name"], "--name")
    # found by scripts/hostile.py: an image with a space was written into the manifests
    _fails(capsys, [*base, "--target", "k8s", "--pvc", "m", "--image", "a b"],
           "not an image reference")
    _fails(capsys, [*base, "--target", "k8s", "--pvc", "m", "--storage-uri", "s3://b/p"],
           "not both")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_out_must_be_new_empty_or_ours(repo, tmp_path, capsys):
    args = ["--repository", str(repo), "--target", "k8s", "--pvc", "m", "--out"]
    file = tmp_path / "file"
    file.write_text("keep")
    _fails(capsys, [*args, str(file)], "is not a folder")
    assert file.read_text() == "keep"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep")
    _fails(capsys, [*args, str(foreign)], "not an output of `deploy`")
    assert [p.name for p in foreign.iterdir()] == ["mine.txt"]
    _fails(capsys, [*args, str(repo / "k8s")], "inside the model repository")
    assert not (repo / "k8s").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    _deploy(repo, empty)
    assert (empty / "deployment.yaml").is_file()
