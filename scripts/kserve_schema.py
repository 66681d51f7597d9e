"""Regenerate hmu_export/deploy/kubernetes/schemas/ from KServe's InferenceService CRD (see its README).

    python scripts/kserve_schema.py serving.kserve.io_inferenceservices.yaml OUT.schema.json.gz

Keeps the v1beta1 ``openAPIV3Schema`` whole, minus its ``description`` texts (they do not take
part in validation and are ~95% of the bytes), as gzip'd JSON with sorted keys: the same input
gives the same bytes (mtime 0).
"""
from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path
from typing import Any

import yaml


def strip_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: strip_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def main(crd_path: str, out_path: str) -> None:
    crd = yaml.safe_load(Path(crd_path).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1beta1")
    schema = strip_descriptions(version["schema"]["openAPIV3Schema"])
    data = json.dumps(schema, sort_keys=True, separators=(",", ":")).encode()
    Path(out_path).write_bytes(gzip.compress(data, mtime=0))


if __name__ == "__main__":
    main(*sys.argv[1:3])
