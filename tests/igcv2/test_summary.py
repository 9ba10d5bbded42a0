"""``python -m igcv2.summary``: every preset with its parameters, multiply-adds and input size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from igcv2.complexity import count_macs, count_params
from igcv2.networks import PRESETS, build
from igcv2.summary import main

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rows() -> list[dict[str, object]]:
    """The JSON the real command prints (one subprocess for the module)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("OMP_NUM_THREADS", "1")
    result = subprocess.run(
        [sys.executable, "-m", "igcv2.summary", "--json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_json_lists_every_preset_with_params_and_macs(rows: list[dict[str, object]]) -> None:
    assert [r["preset"] for r in rows] == list(PRESETS)
    for row in rows:
        builder, kwargs, size = PRESETS[row["preset"]]
        assert row["builder"] == builder
        assert row["kwargs"] == kwargs
        assert row["input"] == list(size)
        assert isinstance(row["params"], int) and row["params"] > 0
        assert isinstance(row["macs"], int) and row["macs"] > 0


def test_json_figures_are_measured_on_the_networks(rows: list[dict[str, object]]) -> None:
    by_name = {r["preset"]: r for r in rows}
    for name in ("fashion", "imagenet-0.25"):
        builder, kwargs, size = PRESETS[name]
        net = build(builder, **kwargs)
        assert by_name[name]["params"] == count_params(net)
        assert by_name[name]["macs"] == count_macs(net, size)


def test_table_prints_a_row_per_preset(rows: list[dict[str, object]], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["preset", "builder", "input", "params", "MACs"]
    assert len(lines) == 1 + len(PRESETS)
    for line, row in zip(lines[1:], rows, strict=True):
        preset, builder, size, params, macs = line.split()
        assert preset == row["preset"] and builder == row["builder"]
        assert size == "x".join(map(str, row["input"]))
        assert params == f"{row['params'] / 1e6:.3f}M"
        assert macs == f"{row['macs'] / 1e6:.1f}M"
