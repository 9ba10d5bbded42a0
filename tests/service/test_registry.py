"""ModelRegistry over a real model store holding a healthy model and every kind of broken artifact."""

from __future__ import annotations

import asyncio
import gc
import json
import shutil
import sys
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY
from samples import fashion_test_images

from igcv2.artifact import CONFIG_FILE, WEIGHTS_FILE, ArtifactError, load_artifact, save_artifact, sha256_file
from igcv2.data import FASHION_MNIST_LABELS
from igcv2.networks import Normalized, build
from service import registry as registry_module
from service.catalog import ServedModel, State, parse_version, validate_name
from service.config import Settings
from service.errors import NotFound, Unavailable
from service.registry import ModelRegistry

torch.set_num_threads(1)
FASHION_INPUT = {"height": 28, "width": 28, "channels": 1, "mean": [0.286], "std": [0.353]}
ARCH = {"builder": "igcv2_fashion", "kwargs": {}}
# Broken artifacts and the reason each must be reported with.
BROKEN = {
    "corrupt": "not a readable safetensors file",
    "checksum": "checksum mismatch",
    "badjson": "is not valid JSON",
    "badschema": "is invalid: labels",
    "misfit": "does not fit architecture",
    "mismatch": "config.json says good v1",
    "badserving": "invalid serving section",
    "typoserving": "'max_batch_sise' not allowed",
}


def fashion_net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = build("igcv2_fashion")
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
    torch.nn.init.normal_(net.classifier.weight)
    return net.eval()


def save(model_dir: Path, seed: int, **overrides: Any) -> Path:
    kwargs: dict[str, Any] = {
        "name": model_dir.name,
        "architecture": ARCH,
        "labels": FASHION_MNIST_LABELS,
        "input_spec": FASHION_INPUT,
        "untrained": True,
        **overrides,
    }
    return save_artifact(fashion_net(seed), model_dir, **kwargs)


def edit_config(version_dir: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = version_dir / CONFIG_FILE
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("model_store")
    save(root / "good", seed=1)
    save(root / "good", seed=2)
    bad_version = save(root / "good", seed=3)  # good/3: checksum mismatch
    (bad_version / WEIGHTS_FILE).write_bytes((bad_version / WEIGHTS_FILE).read_bytes()[:-8] + b"\0" * 8)

    corrupt = save(root / "corrupt", seed=4)  # garbage weights whose checksum is right
    (corrupt / WEIGHTS_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not safetensors at all")
    edit_config(corrupt, lambda c: c.update(weights_sha256=sha256_file(corrupt / WEIGHTS_FILE)))

    checksum = save(root / "checksum", seed=5)
    data = bytearray((checksum / WEIGHTS_FILE).read_bytes())
    data[-1] ^= 0xFF
    (checksum / WEIGHTS_FILE).write_bytes(bytes(data))

    badjson = save(root / "badjson", seed=6)
    (badjson / CONFIG_FILE).write_text('{"name": "badjson", "version": 1,')

    badschema = save(root / "badschema", seed=7)
    edit_config(badschema, lambda c: c.update(labels=[]))

    misfit = save(root / "misfit", seed=8)  # weights of a 10-class network, config says 5 classes
    edit_config(
        misfit,
        lambda c: c.update(
            architecture={"builder": "igcv2_fashion", "kwargs": {"num_classes": 5}}, labels=FASHION_MNIST_LABELS[:5]
        ),
    )

    shutil.copytree(root / "good" / "1", root / "mismatch" / "1")  # says it is good v1

    save(root / "badserving", seed=9, serving={"max_queue_size": 0})  # not set by the operator here
    save(root / "typoserving", seed=11, serving={"max_batch_sise": 4})

    (root / "noversions").mkdir()
    (root / ".hidden").mkdir()
    return root


def settings_for(store: Path, models: str, **kwargs: Any) -> Settings:
    return Settings(_env_file=None, model_store=store, models=models, compile=False, max_batch_size=2, **kwargs)


def with_registry(store: Path, models: str, body: Callable[[ModelRegistry], Awaitable[None]]) -> None:
    """Run ``body`` with a registry whose configured models loaded (in a thread, as the app does)."""

    async def main() -> None:
        registry = ModelRegistry(settings_for(store, models))
        assert not registry.is_ready()
        await asyncio.to_thread(registry.load_configured, asyncio.get_running_loop())
        await asyncio.sleep(0)  # the batchers start on the loop
        try:
            await body(registry)
        finally:
            await registry.close()

    asyncio.run(main())


def ready_gauge(name: str, version: int) -> float | None:
    return REGISTRY.get_sample_value("igcv2_model_ready", {"model": name, "version": str(version)})


def offline_logits(store: Path, name: str, version: int, images: np.ndarray) -> np.ndarray:
    artifact = load_artifact(store / name / str(version))
    spec = artifact.config.input
    with torch.inference_mode():
        return Normalized(artifact.model, spec.mean, spec.std).eval()(torch.from_numpy(images)).numpy()


async def served_logits(served: ServedModel, images: np.ndarray) -> np.ndarray:
    return np.stack(await served.infer(list(images), time.monotonic() + 30))


# ----- discovery -----


def test_every_model_latest_version_when_none_configured(store: Path) -> None:
    registry = ModelRegistry(settings_for(store, ""))
    found = dict(registry.configured_versions())
    assert found == {"good": 3, **dict.fromkeys(BROKEN, 1)}
    assert "noversions" not in found and ".hidden" not in found


def test_configured_versions_follow_settings(store: Path) -> None:
    registry = ModelRegistry(settings_for(store, "good:1,checksum,noversions"))
    assert registry.configured_versions() == [("good", 1), ("checksum", 1)]


def test_configured_versions_may_name_one_model_several_times(store: Path) -> None:
    registry = ModelRegistry(settings_for(store, "good:1,good,good:3,good:2,good:1"))
    assert registry.configured_versions() == [("good", 1), ("good", 3), ("good", 2)]


def test_two_configured_versions_are_served_side_by_side(store: Path) -> None:
    """A canary beside the version it replaces: a request naming no version gets the highest."""
    images = fashion_test_images(3)[0]

    async def body(registry: ModelRegistry) -> None:
        assert registry.is_ready()
        v1, v2 = registry.resolve("good", 1), registry.resolve("good", 2)
        assert v1.state is State.READY and v2.state is State.READY and v1 is not v2
        assert registry.resolve("good") is v2
        np.testing.assert_allclose(
            await served_logits(v1, images), offline_logits(store, "good", 1, images), rtol=0, atol=1e-5
        )
        np.testing.assert_allclose(
            await served_logits(v2, images), offline_logits(store, "good", 2, images), rtol=0, atol=1e-5
        )

    with_registry(store, "good:1,good:2", body)


# ----- load_configured -----


def test_healthy_model_is_served_and_broken_ones_are_reported(store: Path) -> None:
    images = fashion_test_images(5)[0]

    async def body(registry: ModelRegistry) -> None:
        states = {(m.name, m.version): m for m in registry.all()}
        assert set(states) == {("good", 2), *((name, 1) for name in BROKEN)}
        good = states[("good", 2)]
        assert good.state is State.READY and good.reason is None
        for name, reason in BROKEN.items():
            failed = states[(name, 1)]
            assert failed.state is State.FAILED, name
            assert failed.reason is not None and reason in failed.reason, (name, failed.reason)
            assert ready_gauge(name, 1) == 0
            info = failed.describe()
            assert info["ready"] is False and info["state"] == "failed" and reason in info["reason"]
        assert ready_gauge("good", 2) == 1
        assert not registry.is_ready(), "ready although configured models failed"
        served = registry.resolve("good")
        assert served is good
        np.testing.assert_allclose(
            await served_logits(served, images), offline_logits(store, "good", 2, images), rtol=0, atol=1e-5
        )
        info = good.describe()
        assert info["ready"] is True and info["compiled"] is False and info["buckets"] == [1, 2]
        assert sorted(info["bucket_ms"]) == [1, 2] and all(t > 0 for t in info["bucket_ms"].values())
        assert info["labels"] == FASHION_MNIST_LABELS and info["input"]["height"] == 28
        assert info["batching"]["max_batch_size"] == 2

    with_registry(store, "good:2," + ",".join(BROKEN), body)


def test_ready_when_every_configured_model_is_ready(store: Path) -> None:
    async def body(registry: ModelRegistry) -> None:
        assert registry.started and registry.is_ready()
        assert [(m.name, m.version, m.state) for m in registry.all()] == [("good", 2, State.READY)]

    with_registry(store, "good:2", body)


@pytest.mark.parametrize("missing", ["noversions", "absent"])
def test_a_configured_model_missing_from_the_store_keeps_readiness_off(store: Path, missing: str) -> None:
    async def body(registry: ModelRegistry) -> None:
        assert registry.started and registry.resolve("good").state is State.READY
        assert not registry.is_ready(), "ready although a configured model is not in the store"
        assert registry.not_ready() == [f"{missing} not in the model store"]

    with_registry(store, f"good:2,{missing}", body)


def test_a_missing_model_put_in_the_store_and_loaded_makes_the_server_ready(tmp_path: Path) -> None:
    save(tmp_path / "good", seed=0)

    async def body(registry: ModelRegistry) -> None:
        assert not registry.is_ready()
        save(tmp_path / "later", seed=1)
        await asyncio.to_thread(registry.load_version, "later")
        assert registry.is_ready() and registry.not_ready() == []

    with_registry(tmp_path, "good,later", body)


def test_serving_everything_ignores_folders_without_versions(store: Path) -> None:
    registry = ModelRegistry(settings_for(store, ""))
    assert registry.missing_models() == [] and "noversions" not in dict(registry.configured_versions())


def test_serving_section_sets_the_batching(tmp_path: Path) -> None:
    save(tmp_path / "served", seed=10, serving={"max_batch_size": 4, "max_queue_size": 7})

    async def body(registry: ModelRegistry) -> None:
        served = registry.resolve("served")
        assert served.batching["max_batch_size"] == 4  # the serving section beats the default
        assert served.batching["max_queue_size"] == 7
        assert served.runners[0].buckets == [1, 2, 4]
        assert served.batcher is not None and served.batcher.max_queue_size == 7

    async def main() -> None:
        registry = ModelRegistry(Settings(_env_file=None, model_store=tmp_path, compile=False))
        await asyncio.to_thread(registry.load_configured, asyncio.get_running_loop())
        try:
            await body(registry)
        finally:
            await registry.close()

    asyncio.run(main())


# ----- resolve -----


def test_resolve_picks_the_highest_ready_version(store: Path) -> None:
    images = fashion_test_images(3)[0]

    async def body(registry: ModelRegistry) -> None:
        assert registry.resolve("good", 3).state is State.FAILED
        with pytest.raises(Unavailable):
            await registry.resolve("good", 3).infer(list(images), 1e12)
        with pytest.raises(Unavailable) as info:
            registry.resolve("good")  # only a failed version so far
        assert info.value.status_code == 503 and "checksum mismatch" in info.value.message
        v1 = await asyncio.to_thread(registry.load_version, "good", 1)
        v2 = await asyncio.to_thread(registry.load_version, "good", 2)
        assert registry.resolve("good") is v2, "the highest READY version, not the failed v3"
        assert registry.resolve("good", 1) is v1
        np.testing.assert_allclose(
            await served_logits(registry.resolve("good", 1), images),
            offline_logits(store, "good", 1, images),
            rtol=0,
            atol=1e-5,
        )
        np.testing.assert_allclose(
            await served_logits(registry.resolve("good"), images),
            offline_logits(store, "good", 2, images),
            rtol=0,
            atol=1e-5,
        )

    with_registry(store, "good:3", body)


@pytest.mark.parametrize(
    ("name", "version"),
    [("nope", None), ("good", 7), ("../good", None), ("good/../good", 2), ("", None), (".hidden", None)],
)
def test_resolve_unknown_is_404(store: Path, name: str, version: int | None) -> None:
    async def body(registry: ModelRegistry) -> None:
        with pytest.raises(NotFound) as info:
            registry.resolve(name, version)
        assert info.value.status_code == 404

    with_registry(store, "good:2", body)


# ----- load / unload at run time -----


def test_a_load_that_ends_after_close_never_serves_and_leaves_no_thread(store: Path) -> None:
    """A SIGTERM while the control route loads a version: the shutdown does not wait for the load,
    and the version it finishes must not start a batcher, whose thread would keep the process alive."""

    async def main() -> None:
        registry = ModelRegistry(settings_for(store, "good:1"))
        await asyncio.to_thread(registry.load_configured, asyncio.get_running_loop())
        await registry.close()
        with pytest.raises(Unavailable, match="good v2: the service shut down while it loaded"):
            await asyncio.to_thread(registry.load_version, "good", 2)
        await asyncio.sleep(0.1)  # a batcher start would run on the loop now
        assert [(m.name, m.version) for m in registry.all()] == [("good", 1)]
        assert registry.loading() == []
        assert not [t.name for t in threading.enumerate() if t.name.startswith("infer-good-v2")]

    asyncio.run(main())


def test_a_startup_load_that_begins_after_close_starts_nothing(store: Path) -> None:
    """uvicorn failed to bind (or a SIGTERM came) before the loader thread registered anything: it
    must create no inference thread, which the process would wait for at exit (then abort)."""

    async def main() -> None:
        registry = ModelRegistry(settings_for(store, "good:1"))
        await registry.close()
        await asyncio.to_thread(registry.load_configured, asyncio.get_running_loop())
        assert registry.all() == [] and registry.loading() == [] and registry.started
        assert not [t.name for t in threading.enumerate() if t.name.startswith("infer-good")]

    asyncio.run(main())


def test_a_control_route_load_of_a_version_still_warming_up_is_refused(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both loads would finish; the second to register used to orphan the other's batcher, whose
    thread then outlived close() (and the process)."""
    release = hold_loading(monkeypatch, 2)  # the configured v2 stays LOADING until released

    async def main() -> None:
        registry = ModelRegistry(settings_for(store, "good:2"))
        startup = asyncio.ensure_future(asyncio.to_thread(registry.load_configured, asyncio.get_running_loop()))
        while registry.loading() != ["good v2"]:
            await asyncio.sleep(0.01)
        with pytest.raises(Unavailable, match="good version 2 is already loading") as refused:
            await asyncio.to_thread(registry.load_version, "good", 2)
        assert refused.value.headers == {"Retry-After": "5"}
        release.set()
        await startup
        assert registry.is_ready() and registry.resolve("good", 2).state is State.READY
        await registry.close()
        assert not [t.name for t in threading.enumerate() if t.name.startswith("infer-good-v2")]

    asyncio.run(main())


def test_unloading_configured_versions_while_they_load(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One unloaded while it compiles, one before its turn: the loader finishes the rest instead of
    dying on a KeyError (readiness then waited forever), and neither comes back, nor its series."""
    release = hold_loading(monkeypatch, 1)

    async def main() -> None:
        registry = ModelRegistry(settings_for(store, "good:1,good:2,corrupt"))
        startup = asyncio.ensure_future(asyncio.to_thread(registry.load_configured, asyncio.get_running_loop()))
        while "good v1" not in registry.loading():
            await asyncio.sleep(0.01)
        await registry.unload("good", 2)  # registered, its turn not come
        await registry.unload("good", 1)  # loading now
        release.set()
        await startup
        assert registry.started and [(m.name, m.version) for m in registry.all()] == [("corrupt", 1)]
        assert not registry.is_ready()  # only the broken one is left of the configured set
        for version in (1, 2):
            assert ready_gauge("good", version) is None
            assert REGISTRY.get_sample_value("igcv2_queue_capacity", {"model": "good", "version": str(version)}) is None
        await registry.close()
        assert not [t.name for t in threading.enumerate() if t.name.startswith("infer-good")]

    asyncio.run(main())


def test_loading_a_broken_version_leaves_the_served_one_untouched(store: Path) -> None:
    images = fashion_test_images(2)[0]

    async def body(registry: ModelRegistry) -> None:
        served = registry.resolve("good")
        with pytest.raises(ArtifactError, match="checksum mismatch"):
            await asyncio.to_thread(registry.load_version, "good", 3)
        assert registry.resolve("good") is served and served.state is State.READY
        assert [(m.name, m.version) for m in registry.all()] == [("good", 2)]
        # No series for a version that never served: a 0 would fire IGCV2ModelNotReady while ready.
        assert ready_gauge("good", 2) == 1 and ready_gauge("good", 3) is None
        with pytest.raises(ArtifactError, match="'max_batch_sise' not allowed"):  # the 400, not a 500
            await asyncio.to_thread(registry.load_version, "typoserving")
        assert registry.is_ready()
        assert (await served_logits(served, images)).shape == (2, 10)
        for name, version in [("good", 9), ("nope", None), ("../good", None)]:
            with pytest.raises(NotFound):
                await asyncio.to_thread(registry.load_version, name, version)
        assert await asyncio.to_thread(registry.load_version, "good", 2) is served, "a ready version is not reloaded"

    with_registry(store, "good:2", body)


def test_reloading_a_failed_configured_version_keeps_it_failed(store: Path) -> None:
    async def body(registry: ModelRegistry) -> None:
        with pytest.raises(ArtifactError):
            await asyncio.to_thread(registry.load_version, "checksum")
        assert registry.resolve("checksum", 1).state is State.FAILED
        assert not registry.is_ready()

    with_registry(store, "checksum", body)


def test_unload_drains_queued_work_and_removes(store: Path) -> None:
    images = fashion_test_images(6)[0]
    expected = offline_logits(store, "good", 2, images)

    async def body(registry: ModelRegistry) -> None:
        await asyncio.to_thread(registry.load_version, "good", 1)
        v2 = registry.resolve("good", 2)
        requests = [asyncio.create_task(served_logits(v2, images[i : i + 2])) for i in range(0, 6, 2)]
        await asyncio.sleep(0)  # queued
        assert v2.batcher is not None and v2.batcher.depth > 0
        removed = await registry.unload("good", 2)
        assert removed == [v2]
        results = np.concatenate([await r for r in requests])
        np.testing.assert_allclose(results, expected, rtol=0, atol=1e-5)  # finished, not dropped
        with pytest.raises(NotFound):
            registry.resolve("good", 2)
        assert registry.resolve("good").version == 1
        # Its series are gone, not 0: an unloaded version is not one that failed (IGCV2ModelNotReady).
        assert ready_gauge("good", 2) is None and ready_gauge("good", 1) == 1
        assert REGISTRY.get_sample_value("igcv2_queue_capacity", {"model": "good", "version": "2"}) is None
        assert all(r.executor._shutdown for r in v2.runners)  # its inference threads are gone
        with pytest.raises(Unavailable):
            await served_logits(v2, images[:1])  # a request that still holds the old version
        await registry.unload("good")
        assert registry.names() == [] and registry.is_ready()
        with pytest.raises(NotFound):
            registry.resolve("good")
        with pytest.raises(NotFound):
            await registry.unload("good")

    with_registry(store, "good:2", body)


def test_a_hung_compute_holds_up_neither_unload_nor_shutdown(store: Path) -> None:
    """A device call that never returns (a hung GPU kernel): unload and close() end after their
    timeout anyway, its request gets 503, and the version is reported as still computing, so the
    process exits without waiting for that thread (``service.__main__.abandon_loading``)."""
    images = fashion_test_images(1)[0]
    release = threading.Event()

    async def main() -> None:
        registry = ModelRegistry(settings_for(store, "good:1,good:2", shutdown_timeout_s=0.3))
        await asyncio.to_thread(registry.load_configured, asyncio.get_running_loop())
        await asyncio.sleep(0)  # the batchers start on the loop
        hung = registry.resolve("good", 2)
        entered = threading.Event()

        def hang(inputs: list[np.ndarray]) -> np.ndarray:
            entered.set()
            release.wait(60)
            return np.zeros((len(inputs), 10), np.float32)

        hung.runners[0].run = hang  # type: ignore[method-assign]
        request = asyncio.ensure_future(served_logits(hung, images))
        assert await asyncio.to_thread(entered.wait, 10)
        started = time.monotonic()
        await asyncio.wait_for(registry.unload("good", 2), 10)
        assert time.monotonic() - started < 3
        with pytest.raises(Unavailable, match="shut down before this image was computed"):
            await request
        assert registry.still_computing() == ["good v2"]
        assert registry.resolve("good").version == 1  # the other version serves on
        assert (await served_logits(registry.resolve("good"), images)).shape == (1, 10)
        await asyncio.wait_for(registry.close(), 10)
        assert registry.still_computing() == ["good v2"]
        release.set()  # the call returns at last: nothing is left computing, a later exit need not abandon it
        while registry.still_computing():
            await asyncio.sleep(0.01)

    try:
        asyncio.run(main())
    finally:
        release.set()


# ----- small helpers -----


def hold_loading(monkeypatch: pytest.MonkeyPatch, version: int) -> threading.Event:
    """Make every load of ``version`` wait in ``load_artifact`` until the returned event is set."""
    release = threading.Event()
    read_artifact = registry_module.load_artifact

    def held(path: Path) -> Any:
        if path.name == str(version):
            release.wait(30)
        return read_artifact(path)

    monkeypatch.setattr(registry_module, "load_artifact", held)
    return release


@pytest.mark.parametrize(("value", "expected"), [(None, None), ("", None), ("3", 3), (4, 4)])
def test_parse_version(value: str | int | None, expected: int | None) -> None:
    assert parse_version(value) == expected


@pytest.mark.parametrize("value", ["0", "-1", "one", "1.5"])
def test_parse_version_refuses(value: str) -> None:
    with pytest.raises(Exception, match="positive integer") as info:
        parse_version(value)
    assert getattr(info.value, "status_code", None) == 422


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "a" * 65, "x y", "igcv2-fashion\n"])
def test_validate_name_refuses_paths(name: str) -> None:
    with pytest.raises(NotFound):
        validate_name(name)


def test_loaded_models_are_frozen_out_of_the_garbage_collector_and_an_unload_frees_cycles(store: Path) -> None:
    """A full collection over a loaded model's objects stalls the event loop, so loading freezes the
    heap; an unload must still let garbage cycles that were frozen with it be collected."""

    class Node:
        pass

    async def body(registry: ModelRegistry) -> None:
        assert gc.get_freeze_count() > 0
        frozen = gc.get_freeze_count()
        cycle = Node()
        cycle.self = cycle  # type: ignore[attr-defined]  # garbage that only a cyclic collection frees
        alive = weakref.ref(cycle)
        await asyncio.to_thread(registry.load_version, "good", 1)  # freezes the cycle too
        assert gc.get_freeze_count() > frozen
        del cycle
        gc.collect()
        assert alive() is not None  # frozen: out of the collector's reach
        await registry.unload("good", 1)
        assert alive() is None  # unfreeze + collect on unload
        assert gc.get_freeze_count() > 0

    with_registry(store, "good:2", body)


def test_lookups_on_the_loop_survive_a_load_registering_from_its_thread() -> None:
    """A load through the control route registers its version from a thread while the loop resolves
    requests: a lookup iterating the live dict raised 'dictionary changed size during iteration'."""
    registry = ModelRegistry(Settings(_env_file=None, model_store=Path("/nonexistent"), device="cpu"))
    for i in range(2000):
        registry._models[(f"m{i}", 1)] = ServedModel(f"m{i}", 1, Path("unused"))
    stop = time.monotonic() + 0.5

    def register() -> None:  # as ModelRegistry._load does, under the registry's lock
        i = 0
        while time.monotonic() < stop:
            served = ServedModel(f"new{i}", 1, Path("unused"))
            with registry._lock:
                registry._models[(f"new{i}", 1)] = served
            i += 1

    thread = threading.Thread(target=register)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, as the service's 0.1 ms does under load
    thread.start()
    try:
        while time.monotonic() < stop:
            assert "m5" in registry.names() and registry.known_model_label("other") == "unknown"
            assert len(registry.all()) >= 2000
            with pytest.raises(Unavailable):  # found, still LOADING
                registry.resolve("m5")
    finally:
        sys.setswitchinterval(interval)
        thread.join()
