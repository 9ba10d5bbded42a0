"""Precompiling ahead of time, then serving: ``python -m service.precompile`` fills an empty compile cache
(helper processes compiling buckets in parallel), and a server with IGCV2_WORKERS=2 started on it loads
every bucket (its model executor; the front-ends hold no model), compiles none, and answers as the eager
model does."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from live_server import ROOT, live_server
from samples import DEFAULT_MODEL, default_model_store, fashion_pngs, fashion_test_images, multipart

from igcv2.artifact import load_artifact, versions
from igcv2.networks import Normalized

N_IMAGES = 12


def offline_top1(store: Path, n: int) -> list[int]:
    artifact = load_artifact(store / DEFAULT_MODEL / str(versions(store / DEFAULT_MODEL)[-1]))
    spec = artifact.config.input
    with torch.inference_mode():
        logits = Normalized(artifact.model, spec.mean, spec.std)(torch.from_numpy(fashion_test_images(n)[0]))
    return logits.argmax(1).tolist()


@pytest.mark.timeout(1500)  # two buckets compiled on two shared cores
def test_precompiled_cache_serves_every_worker_without_a_compile(tmp_path: Path) -> None:
    store, cache = default_model_store(tmp_path), tmp_path / "compile-cache"
    settings = {
        "IGCV2_MODEL_STORE": str(store),
        "IGCV2_MODELS": DEFAULT_MODEL,
        "IGCV2_DEVICE": "cpu",
        "IGCV2_MAX_BATCH_SIZE": "2",
        "IGCV2_COMPILE_CACHE": str(cache),
        "TORCHINDUCTOR_CACHE_DIR": str(ROOT / ".inductor-cache"),
    }
    # No model named: the configured ones, as the server would load them (an init container's call).
    precompile = subprocess.run(
        [sys.executable, "-m", "service.precompile", "--jobs", "2"],
        cwd=ROOT,
        env={**os.environ, **settings},
        capture_output=True,
        text=True,
        timeout=1400,
    )
    assert precompile.returncode == 0, precompile.stderr
    assert "1 helper process(es) compiling buckets [2, 1] too" in precompile.stderr
    # Each bucket once, by this process or its helper (a helper that keyed a bucket otherwise would compile it again).
    assert sorted(re.findall(r"bucket (\d) compiled ahead of time", precompile.stderr)) == ["1", "2"], precompile.stderr

    with live_server(tmp_path, {**settings, "IGCV2_WORKERS": "2"}) as server:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            answers = [client.post("/classify", files=multipart([png])).json() for png in fashion_pngs(N_IMAGES)]
        log = server.log()
    loads = re.findall(r".*ahead-of-time packages of buckets 1, 2 loaded from the compile cache.*", log)
    assert len(loads) == 1, log[-4000:]  # by the executor: the front-ends hold no model
    assert "torch.compile serves" not in log and "compiled ahead of time" not in log
    served = [a["results"][0]["predictions"][0]["class_id"] for a in answers]
    assert served == offline_top1(store, N_IMAGES)
    assert all(a["model"] == DEFAULT_MODEL for a in answers)
