"""The trained demo model that ships in the package: Spanish cardinal numbers to words.

Files (written by ``python -m hmu_export train-demo``, docs/demo-model.md):
``model/`` holds the native checkpoint (model.safetensors + config.json) and its tokenizer
(tokenizer.json + tokenizer_config.json); ``numbers-es.{dev,test}.jsonl`` are the held-out
sets, lines ``{"source": "2026", "target": "dos mil veintiséis"}``. Paths are computed here,
beside the files, so they hold wherever the package is installed.
"""
from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
MODEL_DIR = DEMO_DIR / "model"
CHECKPOINT = MODEL_DIR / "model.safetensors"
DEV_SET = DEMO_DIR / "numbers-es.dev.jsonl"
TEST_SET = DEMO_DIR / "numbers-es.test.jsonl"
