"""Every setting of the service, read once, from ``IGCV2_*`` environment variables (or a .env).

Precedence for batching settings, lowest to highest: the defaults below, a model's
``serving`` section in its config.json, an ``IGCV2_*`` variable the operator set explicitly.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, create_model, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from igcv2.names import MODEL_NAME, VERSION_TEXT

ENV_PREFIX = "IGCV2_"
MAX_REQUEST_TIMEOUT_S = 3600  # the longest deadline a request may ask for (X-Request-Timeout, OIP timeout)
# Settings a model's config.json "serving" section may override (unless the operator set them).
BATCHING_FIELDS = ("max_batch_size", "max_queue_delay_ms", "max_queue_size", "request_timeout_s", "instances")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=".env", extra="ignore")

    # Models
    model_store: Path = Field(
        Path("model_store"), description="Model store root: <name>/<version>/{config.json,model.safetensors}."
    )
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Models to load, comma-separated 'name' (latest version) or 'name:version'; a name may be listed "
        "with several versions, served side by side (empty: every model, latest version).",
    )
    default_model: str = Field("igcv2-fashion", description="Model used when a request names none.")

    # Runtime
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="auto (CUDA when present, else CPU), cpu, cuda or cuda:N.",
    )
    precision: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto: float16 on CUDA, float32 on CPU."
    )
    compile: bool = Field(True, description="Compile models with torch.compile (false: eager).")
    compile_mode: str = Field(
        "auto", description="torch.compile mode; auto: 'reduce-overhead' (CUDA graphs) on CUDA, 'default' on CPU."
    )
    channels_last: bool = Field(
        False,
        description="channels_last memory format on CUDA (ignored on CPU; slower for IGCV2's group "
        "convolutions on an H200, benchmarks/RESULTS.md).",
    )
    aot: bool = Field(
        True,
        description="Compile ahead of time (torch.export + AOTInductor): one package per batch bucket, kept in "
        "IGCV2_COMPILE_CACHE, so a restart loads in milliseconds what it compiled once (false: torch.compile "
        "at every start).",
    )
    compile_cache: Path = Field(
        Path(".compile-cache"),
        description="Folder of the ahead-of-time compiled packages, shared by workers and restarts (the image: "
        "/cache/aot, on the cache volume); read-only works: what it lacks is compiled and not kept.",
    )
    cpus: int = Field(
        0,
        ge=0,
        le=4096,
        description="Cores this server may use, shared out among its workers; the thread pools are sized from it "
        "(0: the CPUs it may run on, capped by its cgroup's CPU quota such as docker --cpus; Kubernetes "
        "sets it from the pod's CPU request, which nothing in the container can see).",
    )
    cpu_threads: int = Field(
        0,
        ge=0,
        description="Intra-op threads for CPU inference (0: the cores the event loops leave: all but one alone, "
        "all but one per front-end with IGCV2_WORKERS). CPU packages are compiled for it: part of the compile "
        "cache key.",
    )
    instances: int = Field(1, ge=1, le=16, description="Model instances (inference threads) per model version.")
    gil_switch_interval_ms: float = Field(
        0.1,
        gt=0,
        le=100,
        description="Python's GIL switch interval (CPython's own default: 5 ms): the longest the event loop keeps the "
        "GIL while an inference thread waits to get it back after a kernel.",
    )

    # Batching
    max_batch_size: int = Field(32, ge=1, le=1024, description="Largest batch; buckets are 1, 2, 4, ... up to it.")
    max_queue_delay_ms: float = Field(
        0.0,
        ge=0,
        le=10_000,
        description="Longest a queued image waits for companions, from the oldest one's arrival, and never so "
        "long that a queued request's deadline leaves no time to compute it "
        "(0: dispatch at once when the worker is idle; batches still form while it is busy).",
    )
    max_queue_size: int = Field(256, ge=1, description="Images queued per model version before new requests get 503.")
    request_timeout_s: float = Field(
        30.0, gt=0, description="Deadline per request (X-Request-Timeout overrides); expired images are never computed."
    )

    # Limits on input
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="Largest request body (413 above).")
    max_image_pixels: int = Field(40_000_000, ge=1, description="Largest decoded image, width*height (413 above).")
    max_images_per_request: int = Field(64, ge=1, description="Most images in one request (413 above).")
    max_header_bytes: int = Field(
        64 * 1024,
        ge=1024,
        description="Largest request line and headers together (414 for a longer request target alone, 431 otherwise).",
    )
    header_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Longest a request line and headers may take to arrive (408 after; an idle new "
        "connection is closed).",
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Longest pause while a request body arrives (408 after, and the connection is "
        "closed); a pause, not a total, so a large upload on a slow link still arrives.",
    )
    decode_threads: int = Field(0, ge=0, description="Threads decoding images (0: one per core, at least 2).")
    inline_decode_pixels: int = Field(
        16_384,
        ge=0,
        description="Images of at most this many pixels decode on the event loop, larger ones in the decode "
        "threads (a thread hand-off costs more than decoding a small image; 0: always threads).",
    )

    # Security
    api_key: SecretStr | None = Field(
        None, description="When set, every route but health and metrics needs 'Authorization: Bearer <key>'."
    )
    admin_key: SecretStr | None = Field(
        None, description="When set, model load/unload needs 'Authorization: Bearer <admin key>'."
    )

    # Server
    host: str = Field("127.0.0.1", description="Address to listen on (the container uses 0.0.0.0).")
    port: int = Field(8000, ge=1, le=65535, description="Port to listen on.")
    grpc_port: int = Field(
        8001,
        ge=0,
        le=65535,
        description="Port of the Open Inference Protocol over gRPC (Triton's 8001), served beside HTTP by every "
        "server process; 0 turns it off.",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="Log level.")
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Front-end processes sharing the port (HTTP, auth, limits, decoding), each with its own event "
        "loop and GIL; above 1 a model executor process of their own holds the models, queues and batcher for them "
        "all (a GPU host wants several: one process keeps a GPU mostly idle). Front-ends accept connections once "
        "the executor's models are warm; metrics cover every process.",
    )
    shutdown_timeout_s: float = Field(
        30.0, gt=0, description="On SIGTERM, how long to finish queued work before exiting."
    )

    @model_validator(mode="after")
    def _distinct_ports(self) -> Settings:
        if self.grpc_port == self.port:
            raise ValueError(f"IGCV2_GRPC_PORT and IGCV2_PORT are both {self.port}: give gRPC its own port, or 0")
        return self

    @field_validator("api_key", "admin_key")
    @classmethod
    def _no_empty_key(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty key, e.g. from an unset shell variable, would turn the check off without a word.
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("must not be empty or blank: leave the variable unset to turn the check off")
        return value

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("models")
    @classmethod
    def _check_models(cls, value: list[str]) -> list[str]:
        for entry in value:
            name, _, version = entry.partition(":")
            if not MODEL_NAME.fullmatch(name) or (version and not VERSION_TEXT.fullmatch(version)):
                raise ValueError(f"{entry!r} is not 'name' or 'name:version' (a model name, a positive integer)")
        return value

    def batching_for(self, serving: dict[str, Any]) -> dict[str, Any]:
        """Batching settings for one model: defaults < the model's ``serving`` section < explicit env."""
        if unknown := sorted(set(serving) - set(BATCHING_FIELDS)):  # a typo, or a setting only the operator sets
            raise ValueError(
                f"invalid serving section in config.json: {', '.join(map(repr, unknown))} not "
                f"allowed; it may set {', '.join(BATCHING_FIELDS)}"
            )
        merged = {name: getattr(self, name) for name in BATCHING_FIELDS}
        overrides = {
            name: serving[name] for name in BATCHING_FIELDS if name in serving and name not in self.model_fields_set
        }
        try:  # the same bounds as the IGCV2_* variables: an artifact cannot ask for a batch of 0
            checked = _ServingSection.model_validate(overrides)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"invalid serving section in config.json: {problems}") from None
        return merged | {name: getattr(checked, name) for name in overrides}

    @property
    def total_cores(self) -> int:
        """The cores the whole server may use: ``cpus``, or what the process may run on."""
        return self.cpus or usable_cpus()

    @property
    def cores(self) -> int:
        """A front-end's share of the server's cores (all of them with one process)."""
        return max(1, self.total_cores // self.workers)

    @property
    def inference_threads(self) -> int:
        """Intra-op threads of the process that runs the models: ``cpu_threads``, or one per core of its
        share but one. Alone it has every core; as the executor, the cores the front-ends' event loops
        leave (one each)."""
        return self.cpu_threads or max(1, self.total_cores - self.workers)

    @property
    def decode_workers(self) -> int:
        """Threads of the decode pool: ``decode_threads``, or one per core of this process's share (at least 2)."""
        return self.decode_threads or max(2, self.cores)

    def wanted_models(self) -> list[tuple[str, int | None]]:
        """(name, version or None for the latest) from ``models``, in order, without repeats; empty
        means everything in the store. One name may come with several versions (a canary beside
        the version it replaces)."""
        wanted: dict[tuple[str, int | None], None] = {}
        for entry in self.models:
            name, _, version = entry.partition(":")
            wanted[(name, int(version) if version else None)] = None
        return list(wanted)


_ServingSection = create_model(
    "ServingSection",
    **{name: (Settings.model_fields[name].annotation, Settings.model_fields[name]) for name in BATCHING_FIELDS},
)


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may run on, capped by a cgroup v2 CPU quota (``docker --cpus``, a Kubernetes
    CPU limit), rounded up: ``os.cpu_count()`` sees neither, and a container on a large host would size
    its thread pools for cores it may not use."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 CPU controller here: affinity alone
        pass
    return cpus


def env_name(field: str) -> str:
    """The environment variable that sets ``field`` (deployment files and tests use this)."""
    return f"{ENV_PREFIX}{field.upper()}"
