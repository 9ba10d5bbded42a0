"""ModelRegistry: the catalog of a process that loads, compiles and computes its models itself.

Versions load in a background thread (compilation takes a while) so the process is live at
once and ready when every configured model has warmed up. A broken artifact does not stop the
service: it is reported as failed, with the reason, in /models and the logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import gc
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from igcv2.artifact import ArtifactError, load_artifact, versions
from igcv2.names import MODEL_NAME
from service import metrics
from service.batching import Admission, DynamicBatcher
from service.catalog import Catalog, ServedModel, State, validate_name
from service.config import Settings
from service.errors import BadInput, NotFound, Unavailable
from service.runtime import ModelRunner, resolve_device, runtime_options
from service.stats import InferenceStats

log = logging.getLogger("igcv2.registry")


def settle_heap() -> None:
    """Take everything alive now out of the cyclic garbage collector's reach (``gc.freeze``).

    Loaded models bring hundreds of thousands of long-lived objects (modules, compiled graphs,
    dynamo and inductor caches: ~650k for igcv2-fashion). A full collection walks them all, about
    0.3 s during which the event loop stands still: that was the p99 tail under load. Called
    whenever the set of loaded models changes; unfreezing first lets an unloaded model's cycles go.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def record_device_memory() -> None:
    """Set ``igcv2_device_memory_bytes`` from what CUDA has allocated now (nothing on a CPU)."""
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            metrics.DEVICE_MEMORY.labels(device=f"cuda:{i}").set(torch.cuda.memory_allocated(i))


def forget_series(served: ServedModel) -> None:
    """Remove a version's gauges once nothing serves it: gone, not 0, since an unloaded version is not
    one that is not ready (which alerts: IGCV2ModelNotReady). With several workers a series cannot be
    removed; a worker's go when it exits (the supervisor marks it dead)."""
    if metrics.MULTIPROCESS:
        return
    for gauge in (metrics.MODEL_READY, metrics.QUEUE_DEPTH, metrics.QUEUE_CAPACITY):
        with contextlib.suppress(KeyError):
            gauge.remove(served.name, str(served.version))


AdmissionFactory = Callable[[ServedModel, InferenceStats], Admission]


class ModelRegistry(Catalog):
    def __init__(
        self,
        settings: Settings,
        admission: AdmissionFactory | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        """``admission`` makes each version's queue bound (default: counted in this process); ``on_change`` is
        called, from whichever thread made it, after any change of what is served or of a version's state."""
        super().__init__(settings)
        self.device = resolve_device(settings.device)
        self._admission = admission
        self._on_change = on_change or (lambda: None)
        self._pending: set[tuple[str, int]] = set()  # loads through the control route, not yet registered
        self._released: list[ServedModel] = []  # released while a batch was still computing (see still_computing)
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # Loads through the control route compile for a minute; not on the loop's default executor,
        # which asyncio.run waits for at exit, so a shutdown can abandon them (service.__main__).
        self._load_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="model-load")
        self._control: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)  # loads and unloads, by name

    def start(self) -> None:
        """Load every configured version in a thread of its own: the process is live at once."""
        loop = asyncio.get_running_loop()

        def load() -> None:
            self.load_configured(loop)
            record_device_memory()  # after warm-up, so it is there before any scrape

        threading.Thread(target=load, name="model-loader", daemon=True).start()

    # ----- discovery and loading (blocking: run in a thread) -----

    def configured_versions(self) -> list[tuple[str, int]]:
        wanted = self.settings.wanted_models()
        if not wanted and self.store.is_dir():
            wanted = [(p.name, None) for p in sorted(self.store.iterdir()) if p.is_dir() and not p.name.startswith(".")]
        out: dict[tuple[str, int], None] = {}
        for name, version in wanted:
            if not MODEL_NAME.fullmatch(name):
                log.warning("skipping %s: not a valid model name", self.store / name)
                continue
            available = versions(self.store / name)
            version = version or (available[-1] if available else None)
            if version is None:
                log.error("model %s: no version folders in %s", name, self.store / name)
                continue
            out[(name, version)] = None  # 'm' and 'm:3', 3 the latest, are one version
        return list(out)

    def missing_models(self) -> list[str]:
        """Models IGCV2_MODELS names without a version that the store has no version of ('name:3'
        is configured all the same, and its load fails with the reason)."""
        return [
            name
            for name, version in self.settings.wanted_models()
            if version is None and not versions(self.store / name)
        ]

    def load_configured(self, loop: asyncio.AbstractEventLoop) -> None:
        """Load every configured model version (called once, in a background thread).

        Nothing starts loading once the registry is closed (uvicorn may fail to bind, or a SIGTERM
        come, before this thread has registered anything): every version either is registered
        LOADING while its threads exist, which :meth:`loading` reports and the process abandons, or
        never gets threads, which the process would otherwise wait for at exit."""
        self._loop = loop
        targets, missing = self.configured_versions(), self.missing_models()
        if self.settings.default_model not in {name for name, _ in targets}:
            log.warning(
                "the default model %s is not among those configured: requests that name no model get 404",
                self.settings.default_model,
            )
        with self._lock:
            if self._closed:
                self.started = True
                return
            self._configured, self.missing = set(targets), missing
            for name, version in targets:
                self._models[(name, version)] = ServedModel(name, version, self.store / name / str(version))
        try:
            for key in targets:
                served = self._models.get(key)
                if served is None:  # unloaded through the control route before its turn came
                    continue
                if self._closed:
                    served.state, served.reason = State.FAILED, "the service shut down before it loaded"
                    continue
                try:
                    self._load(served)
                except Unavailable as exc:  # shut down or unloaded while it warmed up: not a fault
                    served.state, served.reason = State.FAILED, exc.message
                    log.info("%s", exc.message)
                    self._on_change()
                except Exception as exc:  # a broken artifact must not take the service down
                    self._fail(served, exc)
        finally:  # readiness waits for this flag: never leave it unset
            settle_heap()
            self.started = True
            self._on_change()
            for served in list(self._models.values()):
                for runner in served.runners:
                    runner.start_filling()

    async def load(self, name: str) -> ServedModel:
        """Compilation and warm-up block, so they run in a thread; loads and unloads of one name run one
        at a time (whichever front-end asked)."""
        async with self._control[name]:
            try:
                return await asyncio.get_running_loop().run_in_executor(self._load_pool, self.load_version, name)
            except ArtifactError as exc:
                raise BadInput(f"failed to load model {name!r}: {exc}") from exc

    def load_version(self, name: str, version: int | None = None) -> ServedModel:
        """Load (or reload) a version at run time, blocking; a failure leaves what is served untouched."""
        validate_name(name)
        available = versions(self.store / name)
        if not available:
            raise NotFound(f"model {name!r} not found in the model store")
        version = version or available[-1]
        if version not in available:
            raise NotFound(f"model {name!r} has no version {version} in the model store")
        served = ServedModel(name, version, self.store / name / str(version))
        with self._lock:
            existing = self._models.get((name, version))
            if existing is not None and existing.state is State.READY:
                return existing
            if (name, version) in self._pending or (existing is not None and existing.state is State.LOADING):
                raise Unavailable(f"model {name} version {version} is already loading; retry when it is ready", 5)
            self._pending.add((name, version))
        log.info("%s v%s: loading through the control route", name, version)
        try:
            self._load(served, register=True)  # raises on failure: nothing registered, the served version untouched
        finally:
            with self._lock:
                self._pending.discard((name, version))
        settle_heap()
        return served

    def _load(self, served: ServedModel, register: bool = False) -> None:
        """Load, compile and warm up ``served``, then register it and start its batcher in one step
        under the lock, unless the registry closed meanwhile (a SIGTERM during a load): then its
        threads stop and :class:`Unavailable` says why. So close() either releases a version or it
        never serves: a batcher started after close() would keep its thread, and the process,
        alive. ``register`` is for loads through the control route; a configured version is
        registered (LOADING) before it loads, and must still be the registered one."""
        started = time.perf_counter()
        if not register:  # registered (LOADING): its ready series reads 0; a control-route load gets one once it serves
            metrics.MODEL_READY.labels(**served.labels).set(0)
        artifact = load_artifact(served.path)
        config = artifact.config
        if config.name != served.name or config.version != served.version:
            raise ArtifactError(f"{served.path}: config.json says {config.name} v{config.version}")
        served.config = config
        try:
            served.batching = self.settings.batching_for(config.serving)
        except ValueError as exc:  # the artifact's fault: a 400 on the control route, the reason in /models
            raise ArtifactError(f"{served.path}: {exc}") from None
        options = runtime_options(self.settings, served.batching["max_batch_size"], self.device)
        runners = []
        for i in range(served.batching["instances"]):
            model_copy = artifact if i == 0 else copy.deepcopy(artifact)
            runners.append(ModelRunner(model_copy, options, f"{served.name}-v{served.version}-{i}"))
        # Warm every instance up on its own inference thread (compiled graphs belong to it).
        warmups = [r.executor.submit(r.warmup) for r in runners]
        warmup_s = max(f.result() for f in warmups)
        served.runners = runners
        if self.started:  # a control-route load; the configured models' compiles start once all are warm
            for runner in runners:
                runner.start_filling()
        r = runners[0]
        served.runtime = {
            "device": str(r.device),
            "precision": str(r.options.dtype).removeprefix("torch."),
            "compiled": r.compiled,
            "compile_mode": r.options.mode if r.compiled else None,
            "buckets": r.buckets,
            "instances": len(runners),
            "warmup_s": warmup_s,
            "bucket_ms": {b: round(t * 1000, 3) for b, t in r.bucket_seconds.items()},
        }
        make_admission = self._admission
        served.batcher = DynamicBatcher(
            runners,
            max_batch_size=served.batching["max_batch_size"],
            max_queue_delay_s=served.batching["max_queue_delay_ms"] / 1000,
            max_queue_size=served.batching["max_queue_size"],
            model=served.name,
            version=served.version,
            bucket_seconds=r.bucket_seconds,
            admission=None if make_admission is None else lambda stats: make_admission(served, stats),
        )
        if self._loop is None:
            raise RuntimeError("registry used before load_configured() gave it the event loop")
        key = (served.name, served.version)
        with self._lock:
            refused = self._closed or (not register and self._models.get(key) is not served)
            if not refused:
                served.state, served.reason = State.READY, None  # registered ready: requests may queue at once
                self._models[key] = served
                # A configured model the store lacked at startup, put there since and loaded: no longer missing.
                self.missing = [name for name in self.missing if name != served.name]
                self._loop.call_soon_threadsafe(served.batcher.start)
        if refused:
            for runner in runners:
                runner.close()
            forget_series(served)  # the batcher made its queue series; nothing serves this version
            why = "the service shut down" if self._closed else "it was unloaded"
            raise Unavailable(f"{served.name} v{served.version}: {why} while it loaded", 1)
        metrics.MODEL_READY.labels(**served.labels).set(1)
        metrics.WARMUP_DURATION.labels(**served.labels).set(warmup_s)
        self._on_change()
        log.info(
            "%s v%s ready on %s (%s, %s, %d instance(s)): warm-up %.1fs, load %.1fs; ms per call by bucket %s",
            served.name,
            served.version,
            r.device,
            str(r.options.dtype).removeprefix("torch."),
            f"compiled mode={r.options.mode}" if r.compiled else "eager",
            len(runners),
            warmup_s,
            time.perf_counter() - started,
            ", ".join(f"{b}: {t * 1000:.2f}" for b, t in r.bucket_seconds.items()),
        )

    def _fail(self, served: ServedModel, exc: Exception) -> None:
        served.state, served.reason = State.FAILED, str(exc)
        if self._models.get((served.name, served.version)) is served:  # not if unloaded while it loaded
            metrics.MODEL_READY.labels(**served.labels).set(0)
        log.error(
            "%s v%s NOT loaded: %s", served.name, served.version, exc, exc_info=not isinstance(exc, ArtifactError)
        )
        self._on_change()

    def loading(self) -> list[str]:
        """The versions still being loaded, compiled or warmed up (``name vN``): configured ones at
        startup and loads through the control route."""
        with self._lock:
            pending = sorted(self._pending)
        return [f"{m.name} v{m.version}" for m in self.all() if m.state is State.LOADING] + [
            f"{name} v{version}" for name, version in pending
        ]

    async def unload(self, name: str, version: int | None = None) -> list[ServedModel]:
        validate_name(name)
        async with self._control[name]:
            targets = [m for (n, v), m in self._snapshot() if n == name and version in (None, v)]
            if not targets:
                raise NotFound(f"model {name!r}" + (f" version {version}" if version else "") + " is not loaded")
            for m in targets:
                with self._lock:
                    self._models.pop((m.name, m.version), None)
                    self._configured.discard((m.name, m.version))
                self._on_change()
                await self.release(m)
        settle_heap()
        return targets

    async def statistics(self, models: list[ServedModel]) -> list[dict[str, Any]]:
        return [(m.batcher.stats if m.batcher else InferenceStats()).triton(m.name, m.version) for m in models]

    def still_computing(self) -> list[str]:
        """Released versions (``name vN``) whose model call, still running when their time was up,
        has not returned yet (a hung device call): nothing waits for them, the process exit included."""
        with self._lock:
            released = list(self._released)
        return [f"{m.name} v{m.version}" for m in released if m.batcher is not None and m.batcher.computing()]

    async def release(self, served: ServedModel, timeout: float | None = None) -> None:
        """Stop serving a version: its queue gets ``timeout`` (default: the shutdown timeout) to finish.
        A compute still running then is left to its thread, so an unload or a shutdown never hangs on it."""
        finished = True
        if served.batcher is not None:
            finished = await served.batcher.close(self.settings.shutdown_timeout_s if timeout is None else timeout)
        if not finished:
            with self._lock:
                self._released.append(served)
        for runner in served.runners:
            if finished:
                await asyncio.to_thread(runner.close)
            else:
                runner.close(wait=False)
        forget_series(served)

    async def close(self, timeout: float | None = None) -> None:
        """Graceful shutdown: every batcher finishes its queue (in ``timeout``), then inference threads
        stop. A load still running is not waited for; it will not start serving."""
        with self._lock:
            self._closed = True
        self._load_pool.shutdown(wait=False, cancel_futures=True)
        served = self.all()
        await asyncio.gather(*(self.release(m, timeout) for m in served))
        gc.unfreeze()  # nothing is served any more: the collector may have it all back
