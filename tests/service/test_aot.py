"""Ahead-of-time compiled buckets (service/aot.py) through ModelRunner: a start that misses serves with
torch.compile while a background process fills the cache, and a restart loads every package; bad
packages are replaced; changed weights, options or torch miss; processes share a cold cache; a
read-only cache still serves; and every answer is the eager model's.

Real packages of a small IGCV2 network, compiled here (about 10 s each on 2 cores)."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import textwrap
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from read_only import read_only
from reference import eager_logits, images
from torch import nn

from igcv2.artifact import Artifact, load_artifact, save_artifact
from igcv2.data import load_dataset
from service.aot import AheadOfTime, PackageError, cpu_identity
from service.compile_cache import ENTRY_FILE, PACKAGE_FILE, CompileCache
from service.engine import softmax
from service.runtime import ModelRunner, RuntimeOptions, buckets_for, serving_module

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "model_store" / "igcv2-fashion" / "1"
CPU = torch.device("cpu")
TINY_ARCHITECTURE = {"builder": "igcv2_fashion", "kwargs": {"stem": 8, "widths": [16], "repeats": [1], "levels": 3}}
TINY_INPUT = {"height": 12, "width": 12, "channels": 1, "mean": [0.4], "std": [0.3]}
MakeNet = Callable[..., nn.Module]

pytestmark = pytest.mark.timeout(900)


def save_tiny(store: Path, net: nn.Module) -> Path:
    """The small network as a real artifact in ``store`` (helper processes read it from there)."""
    labels = [f"class{i}" for i in range(10)]
    return save_artifact(
        net, store / "tiny", name="tiny", architecture=TINY_ARCHITECTURE, labels=labels, input_spec=TINY_INPUT
    )


def warmed(artifact: Artifact, cache: Path, max_batch_size: int = 2, **options: Any) -> ModelRunner:
    runner = ModelRunner(
        artifact, RuntimeOptions(device=CPU, max_batch_size=max_batch_size, compile_cache=cache, **options), "aot"
    )
    runner.executor.submit(runner.warmup).result()
    runner.start_filling()  # as the registry does once every model is warm
    return runner


def assert_answers_like_eager(runner: ModelRunner, artifact: Artifact, seed: int = 0) -> None:
    for n in runner.buckets:
        batch = images(n, seed=seed + n)
        got = runner.executor.submit(runner.predict, batch).result()
        np.testing.assert_allclose(got, eager_logits(artifact, batch), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, make_tiny_net: MakeNet) -> Path:
    return save_tiny(tmp_path_factory.mktemp("store"), make_tiny_net(seed=21))


def niceness(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])
    except (OSError, IndexError):
        return None


def filled(runner: ModelRunner) -> int:
    """Wait for the runner's background compile, which must run at the lowest CPU priority; its exit code."""
    assert runner.filling is not None, "nothing compiles the missing packages"
    seen = set()
    while runner.filling.poll() is None and 19 not in seen:
        seen.add(niceness(runner.filling.pid))
        time.sleep(0.05)
    assert 19 in seen, f"never at nice 19: {seen}"
    return runner.filling.wait(timeout=600)


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory: pytest.TempPathFactory, tiny: Path) -> Iterator[tuple[Path, ModelRunner]]:
    """A cache the background compile of a first (cold) start filled, buckets 1 and 2, and that start's runner."""
    cache = tmp_path_factory.mktemp("warm") / "cache"
    runner = warmed(load_artifact(tiny), cache)
    filled(runner)
    yield cache, runner
    runner.close()


def copy_of(cache: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(cache, tmp_path / "cache"))


def entry_of(cache: Path, bucket: int) -> Path:
    (folder,) = [p for p in cache.iterdir() if p.is_dir() and p.name.startswith(f"tiny-v1-b{bucket}-")]
    return folder


def test_a_cold_start_serves_with_torch_compile_and_fills_the_cache_in_the_background(
    warm_cache: tuple[Path, ModelRunner], tiny: Path
) -> None:
    cache, runner = warm_cache
    assert runner.compiled is True and runner.forward is not runner.module and runner.packages == {}
    assert runner.filling is not None and runner.filling.returncode == 0
    assert sorted(p.name.split("-")[2] for p in cache.iterdir() if p.is_dir()) == ["b1", "b2"]
    assert not list(cache.glob(".tmp-*"))
    assert sorted(runner.bucket_seconds) == [1, 2] and all(0 < t < 1 for t in runner.bucket_seconds.values())
    assert_answers_like_eager(runner, load_artifact(tiny))


def test_a_restart_loads_every_bucket_from_the_cache(warm_cache: tuple[Path, ModelRunner], tiny: Path) -> None:
    cache, _ = warm_cache
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*")}
    artifact = load_artifact(tiny)
    runner = warmed(artifact, cache)
    try:
        assert runner.compiled is True and runner.packages == {1: "cache", 2: "cache"}
        assert_answers_like_eager(runner, artifact, seed=100)
    finally:
        runner.close()
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*")} == before, "a hit writes nothing"


def test_cpu_packages_are_frozen(warm_cache: tuple[Path, ModelRunner], tiny: Path) -> None:
    """As torch.compile's CPU graphs here: batch norm folded into oneDNN convolutions with prepacked
    weights, so the compiled model holds fewer constants than the network has parameters and buffers."""
    cache, _ = warm_cache
    with zipfile.ZipFile(entry_of(cache, 2) / PACKAGE_FILE) as archive:
        (wrapper,) = [n for n in archive.namelist() if n.endswith(".wrapper.cpp")]
        code = archive.read(wrapper).decode()
    constants = int(re.search(r"AOTInductorModelBase\(\s*\d+,\s*\d+,\s*(\d+),", code)[1])  # inputs, outputs, constants
    network = load_artifact(tiny).model
    assert constants < len(list(network.parameters())) + len(list(network.buffers())), constants
    assert "mkldnn__convolution_pointwise" in code


def test_a_corrupt_package_is_discarded_and_compiled_again(
    warm_cache: tuple[Path, ModelRunner], tiny: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = copy_of(warm_cache[0], tmp_path)
    package = entry_of(cache, 1) / PACKAGE_FILE
    package.write_bytes(package.read_bytes()[:-4096])  # truncated, as by a full disk or a killed copy
    artifact = load_artifact(tiny)
    with caplog.at_level(logging.WARNING, logger="igcv2.compile_cache"):
        runner = warmed(artifact, cache, max_batch_size=1)
    try:
        assert runner.compiled and runner.packages == {}, "torch.compile serves a start the cache cannot"
        assert any("discarding" in r.getMessage() and "b1" in r.getMessage() for r in caplog.records), caplog.text
        assert_answers_like_eager(runner, artifact)
        assert filled(runner) == 0
    finally:
        runner.close()
    assert CompileCache(cache).lookup(runner_key(artifact, cache, 1)) is not None, "a new package took its place"


def runner_key(artifact: Artifact, cache: Path, bucket: int, **options: Any) -> Any:
    run = RuntimeOptions(device=CPU, compile_cache=cache, **options)
    return AheadOfTime(serving_module(artifact, run), artifact, run, CompileCache(cache)).key(bucket)


def test_a_package_that_passes_every_file_check_but_answers_wrongly_is_replaced(
    warm_cache: tuple[Path, ModelRunner], tiny: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Bucket 1's package filed, with a matching entry, under bucket 2's key (as a key that left out
    something the code depends on would): it loads, and the probe against the eager model refuses it."""
    cache = copy_of(warm_cache[0], tmp_path)
    one, two = entry_of(cache, 1), entry_of(cache, 2)
    entry = json.loads((two / ENTRY_FILE).read_text())
    shutil.copy(one / PACKAGE_FILE, two / PACKAGE_FILE)
    entry |= {k: json.loads((one / ENTRY_FILE).read_text())[k] for k in ("size", "sha256")}
    (two / ENTRY_FILE).write_text(json.dumps(entry))
    artifact = load_artifact(tiny)
    with caplog.at_level(logging.WARNING, logger="igcv2.compile_cache"):
        runner = warmed(artifact, cache)
    try:
        assert runner.compiled and runner.packages == {}
        assert any("cannot serve" in r.getMessage() for r in caplog.records), caplog.text
        assert_answers_like_eager(runner, artifact)
        assert filled(runner) == 0
    finally:
        runner.close()
    restarted = warmed(artifact, cache)
    try:
        assert restarted.packages == {1: "cache", 2: "cache"}
        assert_answers_like_eager(restarted, artifact)
    finally:
        restarted.close()


def test_a_changed_weights_file_misses_the_cache(
    warm_cache: tuple[Path, ModelRunner], tiny: Path, tmp_path: Path, make_tiny_net: MakeNet
) -> None:
    """Same model name and version, other weights (the file replaced in the store): nothing compiled
    for the old weights may serve them."""
    cache = copy_of(warm_cache[0], tmp_path)
    changed = load_artifact(save_tiny(tmp_path / "store", make_tiny_net(seed=22)))
    assert changed.config.name == "tiny" and changed.config.version == 1
    old = load_artifact(tiny)
    options = RuntimeOptions(device=CPU, compile_cache=cache)
    compiler = AheadOfTime(serving_module(changed, options), changed, options, CompileCache(cache))
    with pytest.raises(PackageError, match="differ from the eager model"):  # the old package answers wrongly
        compiler.load(entry_of(cache, 1) / PACKAGE_FILE, 1)
    runner = warmed(changed, cache, max_batch_size=1)
    try:
        assert runner.compiled and runner.packages == {}, "a miss"
        assert_answers_like_eager(runner, changed)
        assert filled(runner) == 0
    finally:
        runner.close()
    assert CompileCache(cache).lookup(runner_key(changed, cache, 1)) is not None, "compiled for the new weights"
    assert CompileCache(cache).lookup(runner_key(old, cache, 1)) is not None, "the old weights' package stays"


def test_every_input_of_the_generated_code_is_in_the_key(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    artifact = load_artifact(tiny)
    base = runner_key(artifact, tmp_path, 4)
    assert runner_key(load_artifact(tiny), tmp_path, 4) == base, "the same model and options: the same key"
    others = {
        "bucket": runner_key(artifact, tmp_path, 8),
        "precision": runner_key(artifact, tmp_path, 4, precision="bfloat16"),
        "compile mode": runner_key(artifact, tmp_path, 4, compile_mode="max-autotune-no-cudagraphs"),
        "channels_last": runner_key(artifact, tmp_path, 4, channels_last=True),
    }
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    others["torch version"] = runner_key(artifact, tmp_path, 4)
    monkeypatch.undo()
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(Path("/proc/cpuinfo").read_text().replace("avx512f", "", 1))
    monkeypatch.setattr("service.aot.cpu_identity", lambda: cpu_identity(cpuinfo))
    others["a CPU flag"] = runner_key(artifact, tmp_path, 4)
    monkeypatch.undo()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)  # the kernels' OpenMP thread count
    others["intra-op threads"] = runner_key(artifact, tmp_path, 4)
    for what, key in others.items():
        assert key.name != base.name, f"{what} changes the code but not the key"
    assert len({key.name for key in others.values()}) == len(others)


PRECOMPILE = [sys.executable, "-m", "service.precompile"]


def compiled_buckets(log: str) -> list[str]:
    return re.findall(r"bucket (\d+) compiled ahead of time", log)


def test_two_processes_filling_one_cold_cache_compile_each_bucket_once(tiny: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    command = [*PRECOMPILE, str(tiny), "--buckets", "1,2", "--cache", str(cache), "--jobs", "1", "--device", "cpu"]
    processes = [subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    logs = [p.communicate(timeout=600)[1] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], logs
    assert sorted(compiled_buckets(logs[0]) + compiled_buckets(logs[1])) == ["1", "2"], logs  # each once
    for log in logs:
        assert re.search(r"tiny-v1: buckets 1, 2 in .*: \d compiled here, \d loaded from the cache", log), log
    assert sorted(p.name.split("-")[2] for p in cache.iterdir() if p.is_dir()) == ["b1", "b2"]
    assert not list(cache.glob(".tmp-*"))


CHILD = textwrap.dedent(
    """
    import json, logging, sys
    from pathlib import Path
    import numpy as np, torch
    from igcv2.artifact import load_artifact
    from igcv2.networks import Normalized
    from service.runtime import ModelRunner, RuntimeOptions
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(int(sys.argv[3]))  # the packages' key holds the intra-op threads they were made for
    artifact = load_artifact(Path(sys.argv[1]))
    spec = artifact.config.input
    batch = [np.random.default_rng(b).integers(0, 256, (12, 12, 1), dtype=np.uint8) for b in range(2)]
    with torch.inference_mode():
        expected = Normalized(artifact.model, spec.mean, spec.std)(torch.from_numpy(np.stack(batch))).numpy()
    for max_batch_size in (2, 4):  # the cache holds buckets 1 and 2, not 4
        options = RuntimeOptions(torch.device("cpu"), max_batch_size=max_batch_size, compile_cache=Path(sys.argv[2]))
        runner = ModelRunner(artifact, options, "child")
        runner.executor.submit(runner.warmup).result()
        runner.start_filling()
        got = runner.executor.submit(runner.predict, batch).result()
        difference = float(np.abs(got - expected).max())
        dynamo = any(m.startswith("torch._dynamo") for m in sys.modules)  # a second of every start, when imported
        print(json.dumps({"packages": runner.packages, "filling": bool(runner.filling), "difference": difference,
                          "dynamo": dynamo}))
        runner.close()
    """
)


def test_a_read_only_cache_loads_what_it_has_and_never_writes(
    warm_cache: tuple[Path, ModelRunner], tiny: Path, tmp_path: Path
) -> None:
    """Every bucket there: loaded. One missing: torch.compile serves, nothing is compiled in the background
    (it could not be kept), and a warning says so (once a process: tests/service/test_compile_cache.py)."""
    cache = copy_of(warm_cache[0], tmp_path)
    before = sorted(p.relative_to(cache) for p in cache.rglob("*"))
    threads = str(torch.get_num_threads())  # the warm cache's packages were compiled for these
    command = read_only(cache, [sys.executable, "-c", CHILD, str(tiny), str(cache), threads])
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    results = [json.loads(line) for line in run.stdout.splitlines()]
    assert [r["packages"] for r in results] == [{"1": "cache", "2": "cache"}, {}], results
    assert not any(r["filling"] for r in results) and all(r["difference"] <= 1e-5 for r in results), results
    assert [r["dynamo"] for r in results] == [False, True], "loading packages needs neither dynamo nor inductor"
    assert len([line for line in run.stderr.splitlines() if "is read-only" in line]) == 1, run.stderr
    assert sorted(p.relative_to(cache) for p in cache.rglob("*")) == before


class DataDependent(nn.Module):
    """A network torch.export refuses (its control flow depends on the data), torch.compile takes (a graph break)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.network(x)
        return logits if x.mean() > 0 else -logits


def test_a_model_torch_export_refuses_raises_and_leaves_nothing_behind(tiny: Path, tmp_path: Path) -> None:
    """What ``python -m service.precompile`` (and a server's background compile) reports loudly; the
    server itself keeps serving with torch.compile."""
    artifact = load_artifact(tiny)
    artifact = replace(artifact, model=DataDependent(artifact.model).eval())
    options = RuntimeOptions(device=CPU, compile_cache=tmp_path / "cache")
    compiler = AheadOfTime(serving_module(artifact, options), artifact, options, CompileCache(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="data-dependent"):
        compiler.packages([1])
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]


def test_compile_off_runs_eager_and_never_touches_the_cache(tiny: Path, tmp_path: Path) -> None:
    runner = warmed(load_artifact(tiny), tmp_path / "cache", compile=False)
    try:
        assert runner.compiled is False and runner.forward is runner.module and runner.packages == {}
    finally:
        runner.close()
    assert not (tmp_path / "cache").exists()


@pytest.mark.timeout(1800)  # a cold cache compiles igcv2-fashion's six buckets
def test_fashion_test_split_answers_exactly_as_the_eager_model() -> None:
    """The shipped model, every bucket (1..32), from the suite's own compile cache (warm after a first
    run; the servers of the end-to-end tests load from it too): the 10,000 test images through
    ModelRunner.predict in batches of 32 (and a last one of 16) against the float32 eager model."""
    data = load_dataset("fashion-mnist", "test")
    artifact = load_artifact(SHIPPED)
    cache = ROOT / ".compile-cache"
    options = RuntimeOptions(device=CPU, max_batch_size=32, compile_cache=cache)
    compiler = AheadOfTime(serving_module(artifact, options), artifact, options, CompileCache(cache))
    compiler.packages(buckets_for(32), jobs=2)  # what precompile does: compiles what the cache lacks
    runner = warmed(artifact, cache, max_batch_size=32)
    try:
        assert runner.compiled and runner.packages == dict.fromkeys(runner.buckets, "cache")

        def predict_all() -> np.ndarray:
            return np.concatenate(
                [runner.predict(list(data.images[i : i + 32])) for i in range(0, len(data.images), 32)]
            )

        served = softmax(runner.executor.submit(predict_all).result())
    finally:
        runner.close()
    eager = softmax(
        np.concatenate(
            [eager_logits(artifact, list(data.images[i : i + 500])) for i in range(0, len(data.images), 500)]
        )
    )
    assert len(served) == 10_000
    assert (served.argmax(1) == eager.argmax(1)).all()
    assert float(np.abs(served - eager).max()) <= 1e-5


def test_a_cpu_package_lets_other_threads_run_while_it_computes() -> None:
    """One process decodes on its event loop while its inference thread computes: a forward that held
    the GIL (torch's package loader does) stalled the loop for every batch, and batches of 32
    connections shrank to one image. Bucket 32 of the shipped model (about 14 ms a call here), in the
    suite's shared cache."""
    artifact = load_artifact(SHIPPED)
    options = RuntimeOptions(device=CPU, max_batch_size=32, compile_cache=ROOT / ".compile-cache")
    compiler = AheadOfTime(serving_module(artifact, options), artifact, options, CompileCache(options.compile_cache))
    forward = compiler.packages([32], 1)[32].forward
    batch = torch.from_numpy(np.stack(images(32, shape=(28, 28, 1))))
    calls = 30
    with ThreadPoolExecutor(1) as thread:
        computing = thread.submit(lambda: [forward(batch) for _ in range(calls)])
        stalls, last = 0, time.perf_counter()
        while not computing.done():
            now = time.perf_counter()
            stalls += now - last > 0.008
            last = now
        computing.result()
    assert stalls <= calls // 5, f"this thread stood still {stalls} times in {calls} forwards"
