"""The bundled default model: present, small, and as accurate as the issue demands."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from live_server import MODEL_STORE, ROOT

from igcv2.artifact import load_artifact, versions

MODEL_DIR = MODEL_STORE / "igcv2-fashion"


def test_default_model_is_shipped_and_loads() -> None:
    assert versions(MODEL_DIR), f"no version folder in {MODEL_DIR}"
    artifact = load_artifact(MODEL_DIR / "1")
    config = artifact.config
    assert config.params <= 500_000
    assert config.architecture.builder == "igcv2_fashion"
    assert config.metrics is not None and config.metrics["top1"] >= 0.940
    assert config.training is not None and config.training["command"].startswith("python -m igcv2.train")
    assert config.training["epochs"] >= 1 and config.training["wall_time_s"] > 0
    assert not config.untrained


def test_default_model_reaches_094_on_the_test_split() -> None:
    """Measured by the evaluate command itself, on all 10k test images."""
    result = subprocess.run(
        [sys.executable, "-m", "igcv2.evaluate", str(MODEL_DIR / "1"), "--dataset", "fashion-mnist",
         "--split", "test", "--json"],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    report = json.loads(result.stdout)
    assert report["n"] == 10_000
    assert report["top1"] >= 0.940
