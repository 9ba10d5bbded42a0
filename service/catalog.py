"""What a process serves, as the routes see it: model versions, their state and queues, and which answers a request.

Two kinds of process hold a :class:`Catalog`: one that loads and computes its models itself
(:class:`service.registry.ModelRegistry`), and a front-end whose models live in the executor process
(:class:`service.executor.remote.RemoteCatalog`). The routes and the engine cannot tell them apart,
and this module needs no torch: a front-end never imports it.
"""

from __future__ import annotations

import contextlib
import enum
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from igcv2.names import MODEL_NAME
from igcv2.store import ArtifactConfig
from service.batching import Admission, Reservation
from service.client import Client
from service.config import Settings
from service.errors import InvalidParameter, NotFound, Unavailable

if TYPE_CHECKING:
    from service.runtime import ModelRunner


class State(enum.StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class Queue(Protocol):
    """A model version's queue: its bound, and the way to the model (the batcher, or the executor's)."""

    admission: Admission

    async def submit(
        self, images: np.ndarray, deadline: float, reservation: Reservation | None = None, client: Client | None = None
    ) -> list[np.ndarray]: ...


@dataclass(eq=False)
class ServedModel:
    """One model version: its artifact config, runners (instances, where it computes) and queue."""

    name: str
    version: int
    path: Path
    state: State = State.LOADING
    reason: str | None = None
    config: ArtifactConfig | None = None
    batching: dict[str, Any] = field(default_factory=dict)
    runners: list[ModelRunner] = field(default_factory=list)
    batcher: Queue | None = None
    runtime: dict[str, Any] = field(default_factory=dict)  # device, precision, compilation, bucket times

    @property
    def labels(self) -> dict[str, str]:
        return {"model": self.name, "version": str(self.version)}

    @property
    def ready_config(self) -> ArtifactConfig:
        """The artifact config of a ready version (503 otherwise)."""
        if self.state is not State.READY or self.config is None:
            raise Unavailable(self.not_ready_message(), 5)
        return self.config

    def not_ready_message(self) -> str:
        reason = f": {self.reason}" if self.reason else ""
        return f"model {self.name} version {self.version} is not ready ({self.state}{reason})"

    @contextlib.contextmanager
    def admitted(self, n: int, timeout_s: float | None, arrival: float) -> Iterator[tuple[float, Reservation]]:
        """Admission before any decoding: 503 unless ready with room for ``n`` images, room then held
        for them until they are queued by :meth:`infer`, or given back when the request leaves this
        block without. Yields the request's deadline (its own timeout, else this model's
        ``request_timeout_s``, from arrival) and the room."""
        if self.state is not State.READY or self.batcher is None:
            raise Unavailable(self.not_ready_message(), 5)
        room = self.batcher.admission.reserve(n)
        try:
            yield arrival + (timeout_s if timeout_s is not None else self.batching["request_timeout_s"]), room
        finally:
            room.release()  # a no-op once the images were queued

    async def infer(
        self, images: np.ndarray, deadline: float, room: Reservation | None = None, client: Client | None = None
    ) -> list[np.ndarray]:
        """Logits for each image, through the shared dynamic batcher (into ``room``, from :meth:`admitted`;
        withdrawn if ``client`` leaves first)."""
        if self.state is not State.READY or self.batcher is None:
            raise Unavailable(self.not_ready_message(), 5)
        return await self.batcher.submit(images, deadline, room, client)

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "state": str(self.state),
            "ready": self.state is State.READY,
            "reason": self.reason,
        }
        if self.config is not None:
            c = self.config
            info.update(
                input=c.input.model_dump(),
                labels=c.labels,
                metrics=c.metrics,
                params=c.params,
                macs=c.macs,
                architecture=c.architecture.model_dump(),
                untrained=c.untrained,
            )
        info.update(self.runtime)
        info["batching"] = self.batching
        return info


def validate_name(name: str) -> str:
    """Model names index the file system: refuse anything that is not a plain name (no ../)."""
    if not MODEL_NAME.fullmatch(name):
        raise NotFound(f"unknown model {name!r}")
    return name


def parse_version(value: str | int | None) -> int | None:
    if value is None or value == "":
        return None
    try:
        version = int(value)
    except (TypeError, ValueError):
        raise InvalidParameter(f"version must be a positive integer, got {value!r}") from None
    if version < 1:
        raise InvalidParameter(f"version must be a positive integer, got {value!r}")
    return version


class Catalog(ABC):
    """The model versions a process serves, looked up by name and version. Subclasses keep it filled:
    by loading models here, or from the executor's word."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = Path(settings.model_store)
        self._models: dict[tuple[str, int], ServedModel] = {}
        self._configured: set[tuple[str, int]] = set()
        self.missing: list[str] = []  # named in IGCV2_MODELS, no version in the store: never ready
        self._lock = threading.Lock()
        self.started = False  # every configured version has been tried

    def resolve(self, name: str, version: int | None = None) -> ServedModel:
        """The version a request addresses: the named one, or the highest ready one."""
        validate_name(name)
        candidates = sorted((m for (n, _), m in self._snapshot() if n == name), key=lambda m: m.version)
        if not candidates:
            raise NotFound(f"unknown model {name!r}; loaded: {', '.join(self.names()) or 'none'}")
        if version is not None:
            for m in candidates:
                if m.version == version:
                    return m
            raise NotFound(
                f"model {name!r} has no loaded version {version}; loaded: "
                f"{', '.join(str(m.version) for m in candidates)}"
            )
        ready = [m for m in candidates if m.state is State.READY]
        if ready:
            return ready[-1]
        raise Unavailable(candidates[-1].not_ready_message(), 5)

    def names(self) -> list[str]:
        return sorted({n for (n, _), _ in self._snapshot()})

    def all(self) -> list[ServedModel]:
        return [m for _, m in sorted(self._snapshot(), key=lambda entry: entry[0])]

    def _snapshot(self) -> list[tuple[tuple[str, int], ServedModel]]:
        """The registered versions, copied under the lock: a load through the control route registers
        its version from a thread, and iterating the dict meanwhile raises (a 500)."""
        with self._lock:
            return list(self._models.items())

    @property
    def configured(self) -> list[tuple[str, int]]:
        """The versions readiness waits for."""
        with self._lock:
            return sorted(self._configured)

    def is_ready(self) -> bool:
        return (
            self.started
            and not self.missing
            and all((k in self._models and self._models[k].state is State.READY) for k in self._configured)
        )

    def not_ready(self) -> list[str]:
        """What readiness waits for: versions not ready (``name vN state``) and configured models the
        store lacks."""
        return [f"{m.name} v{m.version} {m.state}" for m in self.all() if m.state is not State.READY] + [
            f"{name} not in the model store" for name in self.missing
        ]

    def known_model_label(self, name: str) -> str:
        """A bounded metrics label: the model name if it is loaded, else 'unknown'."""
        return name if any(n == name for (n, _), _ in self._snapshot()) else "unknown"

    # ----- what differs with where the models are -----

    @abstractmethod
    def start(self) -> None:
        """Begin filling the catalog (on the event loop); :attr:`started` turns true once every configured
        version has been tried."""

    @abstractmethod
    async def load(self, name: str) -> ServedModel:
        """Load (or reload) a model's newest version from the store while everything else keeps serving."""

    @abstractmethod
    async def unload(self, name: str, version: int | None = None) -> list[ServedModel]:
        """Stop serving a model (all versions, or one); queued work finishes first."""

    @abstractmethod
    async def statistics(self, models: list[ServedModel]) -> list[dict[str, Any]]:
        """Triton's statistics of each of ``models`` (its ``model_stats`` entries)."""

    @abstractmethod
    async def close(self, timeout: float | None = None) -> None:
        """Graceful shutdown: queued work finishes (within ``timeout``), nothing new is taken."""

    def loading(self) -> list[str]:
        """Versions this process is still loading (``name vN``): an exit abandons them."""
        return []

    def still_computing(self) -> list[str]:
        """Released versions whose model call has not returned (a hung device): an exit abandons them."""
        return []
