"""The bundled default model: present, small, and as accurate as its config.json says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import cache

import pytest
from live_server import MODEL_STORE, ROOT

from igcv2.artifact import ArtifactConfig, load_artifact, versions

MODEL_DIR = MODEL_STORE / "igcv2-fashion"
TARGET_TOP1 = 0.940  # issue 2


@cache
def measured_top1() -> dict:
    """Top-1 on all 10k test images, measured by the evaluate command itself."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "igcv2.evaluate",
            str(MODEL_DIR / "1"),
            "--dataset",
            "fashion-mnist",
            "--split",
            "test",
            "--json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return json.loads(result.stdout)


def shipped_config() -> ArtifactConfig:
    return load_artifact(MODEL_DIR / "1").config


def test_default_model_is_shipped_and_loads() -> None:
    assert versions(MODEL_DIR), f"no version folder in {MODEL_DIR}"
    config = shipped_config()
    assert config.params <= 500_000
    assert config.architecture.builder == "igcv2_fashion"
    assert config.metrics is not None and config.metrics["n"] == 10_000
    assert config.training is not None and config.training["command"].startswith("python -m igcv2.train")
    assert config.training["epochs"] >= 1 and config.training["wall_time_s"] > 0
    assert not config.untrained


def test_evaluate_reproduces_the_recorded_accuracy() -> None:
    report = measured_top1()
    assert report["n"] == 10_000
    assert report["top1"] == pytest.approx(shipped_config().metrics["top1"], abs=1e-4)
    assert report["top1"] > 0.9  # a trained classifier, far above chance (0.1)


def test_default_model_meets_the_issue_target() -> None:
    assert measured_top1()["top1"] >= TARGET_TOP1
