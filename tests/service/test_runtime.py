"""ModelRunner: buckets, padding, eager vs compiled, its own inference thread, and the eager fallback."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from reference import eager_logits, images
from torch._inductor.utils import run_and_get_code

from igcv2.artifact import Artifact
from service.config import Settings
from service.runtime import (
    ModelRunner,
    RuntimeOptions,
    buckets_for,
    own_cuda_graph_trees,
    resolve_device,
    runtime_options,
)

torch.set_num_threads(1)
CPU = torch.device("cpu")
MakeArtifact = Callable[..., Artifact]


def warmed(artifact: Artifact, **options: Any) -> ModelRunner:
    runner = ModelRunner(artifact, RuntimeOptions(device=CPU, **options), name="test")
    runner.executor.submit(runner.warmup).result()
    return runner


@pytest.mark.parametrize(
    ("max_batch_size", "expected"),
    [
        (1, [1]),
        (2, [1, 2]),
        (4, [1, 2, 4]),
        (6, [1, 2, 4, 6]),
        (32, [1, 2, 4, 8, 16, 32]),
        (33, [1, 2, 4, 8, 16, 32, 33]),
        (100, [1, 2, 4, 8, 16, 32, 64, 100]),
    ],
)
def test_buckets(max_batch_size: int, expected: list[int]) -> None:
    assert buckets_for(max_batch_size) == expected


def test_options() -> None:
    cpu = RuntimeOptions(device=CPU)
    assert cpu.dtype == torch.float32 and cpu.mode == "default"
    cuda = RuntimeOptions(device=torch.device("cuda"))
    assert cuda.dtype == torch.float16 and cuda.mode == "reduce-overhead" and not cuda.channels_last
    assert RuntimeOptions(device=CPU, precision="bfloat16", compile_mode="reduce-overhead").dtype == torch.bfloat16
    assert RuntimeOptions(device=CPU, compile_mode="reduce-overhead").mode == "reduce-overhead"


def test_runtime_options_follow_the_settings(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, compile_cache=tmp_path, cpus=4, workers=2, precision="bfloat16")
    options = runtime_options(settings, 8, CPU)
    assert (options.device, options.max_batch_size, options.dtype) == (CPU, 8, torch.bfloat16)
    assert options.compile_cache == tmp_path and options.compile_jobs == 2, "this worker's share of the cores"
    assert runtime_options(Settings(_env_file=None, aot=False), 8, CPU).compile_cache is None


def test_resolve_device() -> None:
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda:0")


@pytest.fixture(scope="module")
def eager_runner(make_tiny_artifact: MakeArtifact) -> Iterator[tuple[Artifact, ModelRunner]]:
    artifact = make_tiny_artifact(seed=1)
    runner = warmed(artifact, compile=False, max_batch_size=6)
    yield artifact, runner
    runner.close()


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6])
def test_padded_prediction_equals_unpadded_forward(eager_runner: tuple[Artifact, ModelRunner], n: int) -> None:
    artifact, runner = eager_runner
    assert runner.bucket(n) == next(b for b in [1, 2, 4, 6] if b >= n)
    batch = images(n, seed=n)
    out = runner.executor.submit(runner.predict, batch).result()
    assert out.shape == (n, 10) and out.dtype == np.float32
    np.testing.assert_allclose(out, eager_logits(artifact, batch), rtol=0, atol=1e-5)


def test_padding_rows_do_not_leak_into_results(eager_runner: tuple[Artifact, ModelRunner]) -> None:
    """A smaller batch after a larger one reuses the buffer whose tail still holds old images."""
    artifact, runner = eager_runner
    big, small = images(6, seed=10), images(5, seed=11)
    runner.executor.submit(runner.predict, big).result()
    out = runner.executor.submit(runner.predict, small).result()
    np.testing.assert_allclose(out, eager_logits(artifact, small), rtol=0, atol=1e-5)


def test_outputs_are_not_views_of_reused_buffers(eager_runner: tuple[Artifact, ModelRunner]) -> None:
    _, runner = eager_runner
    first = runner.executor.submit(runner.predict, images(2, seed=20)).result()
    kept = first.copy()
    runner.executor.submit(runner.predict, images(2, seed=21)).result()
    np.testing.assert_array_equal(first, kept)


@pytest.mark.parametrize("n", [0, 7])
def test_batch_outside_buckets_is_refused(eager_runner: tuple[Artifact, ModelRunner], n: int) -> None:
    _, runner = eager_runner
    with pytest.raises(ValueError, match=r"allowed 1\.\.6"):
        runner.predict(images(n))


def test_run_computes_on_the_instance_thread(eager_runner: tuple[Artifact, ModelRunner]) -> None:
    artifact, runner = eager_runner
    seen: list[str] = []
    forward = runner.forward

    def recording(batch: torch.Tensor) -> torch.Tensor:
        seen.append(threading.current_thread().name)
        return forward(batch)

    runner.forward = recording  # type: ignore[assignment]
    try:
        out = runner.executor.submit(runner.run, images(3, seed=30)).result()
        runner.executor.submit(runner.run, images(3, seed=30)).result()
    finally:
        runner.forward = forward
    np.testing.assert_allclose(out, eager_logits(artifact, images(3, seed=30)), rtol=0, atol=1e-5)
    assert len(seen) == 2 and len(set(seen)) == 1, "every call must run on the same single thread"
    assert seen[0].startswith("infer-test") and seen[0] != threading.current_thread().name


def test_three_channel_model(make_tiny_artifact: MakeArtifact) -> None:
    artifact = make_tiny_artifact(seed=2, channels=3, height=10, width=14, mean=[0.5, 0.4, 0.3], std=[0.2, 0.3, 0.4])
    runner = warmed(artifact, compile=False, max_batch_size=2)
    try:
        batch = images(2, shape=(10, 14, 3), seed=3)
        np.testing.assert_allclose(
            runner.executor.submit(runner.predict, batch).result(), eager_logits(artifact, batch), rtol=0, atol=1e-5
        )
    finally:
        runner.close()


@pytest.mark.timeout(240)
def test_compiled_agrees_with_eager(make_tiny_artifact: MakeArtifact) -> None:
    artifact = make_tiny_artifact(seed=4)
    runner = warmed(artifact, compile=True, max_batch_size=2)
    try:
        assert runner.compiled is True
        assert runner.forward is not runner.module
        assert sorted(runner.bucket_seconds) == [1, 2] and all(0 < t < 1 for t in runner.bucket_seconds.values())
        for n in (1, 2):
            batch = images(n, seed=40 + n)
            out = runner.executor.submit(runner.predict, batch).result()
            np.testing.assert_allclose(out, eager_logits(artifact, batch), rtol=1e-4, atol=1e-5)
    finally:
        runner.close()


@pytest.mark.timeout(240)
def test_cpu_graphs_are_frozen(make_tiny_artifact: MakeArtifact) -> None:
    """Frozen, batch norm folds into the convolutions and each C++-wrapped graph takes fewer tensors
    per call than the network has parameters (unfrozen: every parameter and buffer, and releasing
    each one needed the GIL back, so the forward waited for the busy HTTP loop each time)."""
    artifact = make_tiny_artifact(seed=6)
    runner = ModelRunner(artifact, RuntimeOptions(device=CPU, compile=True, max_batch_size=2), name="test")
    try:
        _, sources = run_and_get_code(lambda: runner.executor.submit(runner.warmup).result())
        assert runner.compiled is True
        found = [re.search(r"steal_from_raw_handles_to_raii_handles\(input_handles, (\d+)\)", s) for s in sources]
        inputs = [int(f[1]) for f in found if f]
        assert len(inputs) == 2, "one C++-wrapped graph per bucket"
        assert max(inputs) < len(list(artifact.model.parameters())), inputs
    finally:
        runner.close()


@pytest.mark.timeout(300)
def test_every_instance_and_reload_of_one_architecture_is_compiled(make_tiny_artifact: MakeArtifact) -> None:
    """Dynamo keeps one graph per bucket on the code object it compiles, up to ``recompile_limit``.
    Three instances of one network (IGCV2_INSTANCES=3, or a version loaded thrice) used to share
    the network's ``forward``: the third passed the limit and served eager at half speed while
    reporting itself compiled. Each runner now compiles its own graphs."""
    from torch._dynamo.utils import counters

    artifact = make_tiny_artifact(seed=7)
    graphs = counters["stats"]["unique_graphs"]
    runners = [warmed(artifact, compile=True, max_batch_size=4) for _ in range(3)]  # 3 buckets each: 9 > 8
    try:
        assert [r.compiled for r in runners] == [True, True, True]
        assert counters["stats"]["unique_graphs"] - graphs == 9, "one graph per bucket per instance"
        batch = images(3, seed=70)
        for runner in runners:
            np.testing.assert_allclose(
                runner.executor.submit(runner.predict, batch).result(),
                eager_logits(artifact, batch),
                rtol=1e-4,
                atol=1e-5,
            )
    finally:
        for runner in runners:
            runner.close()


def raising_compile(*args: Any, **kwargs: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """A torch.compile whose graph fails on its first call, as an inductor error would."""

    def compiled(batch: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("inductor exploded")

    return compiled


@pytest.mark.parametrize("failure", ["invalid mode", "first call fails"])
def test_compile_failure_falls_back_to_eager_loudly(
    make_tiny_artifact: MakeArtifact,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    failure: str,
) -> None:
    artifact = make_tiny_artifact(seed=5)
    options: dict[str, Any] = {"compile": True, "max_batch_size": 2}
    if failure == "invalid mode":
        options["compile_mode"] = "no-such-mode"  # torch.compile itself raises
    else:
        monkeypatch.setattr(torch, "compile", raising_compile)
    with caplog.at_level(logging.ERROR, logger="igcv2.runtime"):
        runner = warmed(artifact, **options)
    try:
        assert runner.compiled is False
        assert runner.forward is runner.module
        errors = [r for r in caplog.records if r.name == "igcv2.runtime" and r.levelno == logging.ERROR]
        assert errors and "FALLING BACK TO EAGER" in errors[0].getMessage()
        assert errors[0].exc_info is not None  # the cause is in the log, not swallowed
        batch = images(2, seed=50)
        np.testing.assert_allclose(
            runner.executor.submit(runner.predict, batch).result(), eager_logits(artifact, batch), rtol=0, atol=1e-5
        )
    finally:
        runner.close()


def test_warmup_runs_every_bucket(make_tiny_artifact: MakeArtifact) -> None:
    artifact = make_tiny_artifact(seed=6)
    runner = ModelRunner(artifact, RuntimeOptions(device=CPU, compile=False, max_batch_size=5), name="w")
    sizes: list[int] = []
    forward = runner.forward

    def recording(batch: torch.Tensor) -> torch.Tensor:
        sizes.append(batch.shape[0])
        return forward(batch)

    runner.forward = recording  # type: ignore[assignment]
    try:
        seconds = runner.executor.submit(runner.warmup).result()
    finally:
        runner.close()
    assert seconds > 0
    assert sorted(set(sizes)) == [1, 2, 4, 5] and all(sizes.count(b) >= 3 for b in (1, 2, 4, 5))


def test_every_inference_thread_gets_its_own_cuda_graph_trees() -> None:
    """torch < 2.13 set up inductor's CUDA-graph trees only in the importing thread (here: this one);
    a plain thread lacks them, a CUDA runner's inference thread (this initializer) must have them."""
    from torch._inductor import cudagraph_trees

    def has_trees() -> bool:
        return all(hasattr(cudagraph_trees.local, a) for a in ("tree_manager_containers", "tree_manager_locks"))

    with ThreadPoolExecutor(1) as plain:
        assert not plain.submit(has_trees).result()
    with ThreadPoolExecutor(1, initializer=own_cuda_graph_trees) as inference:
        assert inference.submit(has_trees).result()
