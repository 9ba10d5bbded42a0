"""Ahead-of-time compiled models: torch.export + AOTInductor, one package per batch bucket, cached.

Why it is shaped like this:
* A package is native code for one input shape: compiled once, then loaded in milliseconds by every
  restart, worker and replica that shares the cache. torch.compile repeats its compile at every start
  (inductor's FX-graph cache never holds frozen graphs): over a minute for igcv2-fashion on 2 cores.
* The key is everything that changes the generated code: the module's weights and buffers as they sit
  on the device, the source files of its classes, the architecture and input, bucket, precision, device
  and capability (packages are built with -march=native: CPU model and feature flags; GPU name and
  compute capability), torch and the compile options (service/compile_cache.py keeps the entries).
* On CPU the graph is frozen as torch.compile's is here (batch norm folded into the convolutions,
  oneDNN's prepacked weights); inductor freezes only without autograd, so the compile runs under no_grad.
* On CUDA, with a compile mode that uses CUDA graphs (reduce-overhead, the default there), each loaded
  package is captured in a CUDA graph of its own and replayed: one launch per batch, as torch.compile's
  CUDA graphs give today. UNMEASURED: written from PyTorch's documentation (``run_single_threaded``
  exists for this capture), without a GPU; benchmarks/RESULTS.md lists what is owed.
* Every package, from the cache or fresh, answers a probe batch like the eager module before it serves.
* Packages load through ``torch._C._aoti.AOTIModelPackageLoader``, the loader ``aoti_load_package`` ends
  in: that wrapper first probes the CPU's vector ISA by compiling and loading test programs in
  subprocesses (2.5 s at every process start) and reads any exported program found in the archive.
* On CPU the package's model is called through its C entry points with ctypes instead
  (:class:`CpuPackage`): the loader holds the GIL for the whole forward, so one process's event loop
  stalled for every batch (measured: batches of 1.02 images at 32 connections, 0.16x the throughput).
* A package costs about 1.4x torch.compile's CPU time per bucket (AOTInductor's runtime is compiled into
  each: 6 s of C++ for even a trivial model), so a server that misses does not wait for them: it serves
  with torch.compile, as before, and once warm starts a background process (``python -m
  service.precompile``, at the lowest CPU priority) that fills the cache for its next start. ``python -m
  service.precompile`` itself compiles in the foreground, with helper processes taking buckets under the
  cache's per-key locks, as other workers and replicas do.
"""

from __future__ import annotations

import ctypes
import hashlib
import inspect
import logging
import os
import platform
import subprocess
import sys
import threading
import time
import weakref
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from igcv2.artifact import WEIGHTS_FILE, Artifact, ArtifactError, read_config, sha256_file
from service.compile_cache import PACKAGE_FILE, CacheKey, CompileCache

if TYPE_CHECKING:
    from service.runtime import RuntimeOptions

log = logging.getLogger("igcv2.aot")
FORMAT = 1  # bump when what this module compiles or writes changes: older entries then miss
POLL_S = 0.2  # how often a process waiting for another's package looks again
PROBE_ROWS = 2  # rows of each probe batch compared with the eager module
TOLERANCE = {torch.float32: 1e-3}  # of the logits' scale; reduced precisions: 5e-2
HELPER_STOP_S = 10.0
Forward = Callable[[torch.Tensor], torch.Tensor]
# torch.export and inductor change process-wide state while they work: one compilation at a time here
# (other instances of the model wait; other processes compile other buckets meanwhile).
_compiling = threading.Lock()
_filling: dict[tuple[str, ...], subprocess.Popen[bytes]] = {}  # background compiles, by the entries they make
_filling_lock = threading.Lock()


class PackageError(RuntimeError):
    """A package that loads but must not serve (its answers differ from the eager module's)."""


@dataclass(frozen=True)
class Package:
    forward: Forward
    origin: str  # "cache" or "compiled"


def inductor_configs(device: torch.device, mode: str) -> dict[str, Any]:
    """Inductor options of the packages: the compile mode's, less CUDA graphs (captured around the loaded
    package instead), and freezing on CPU (benchmarks/RESULTS.md, runs I and J). Imported here, not at
    the top: inductor brings dynamo (a second of every start), which loading packages never needs."""
    import torch._inductor

    configs = {k: v for k, v in torch._inductor.list_mode_options(mode).items() if k != "triton.cudagraphs"}
    return configs | ({"freezing": True} if device.type == "cpu" else {})


def precision_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def uses_cuda_graphs(device: torch.device, mode: str) -> bool:
    if device.type != "cuda":
        return False
    import torch._inductor

    return bool(torch._inductor.list_mode_options(mode).get("triton.cudagraphs"))


def device_identity(device: torch.device) -> dict[str, Any]:
    """What a package compiled for ``device`` needs of the device that loads it."""
    if device.type == "cuda":
        return {
            "type": "cuda",
            "name": torch.cuda.get_device_name(device),
            "capability": list(torch.cuda.get_device_capability(device)),
            "cuda": torch.version.cuda,
        }
    return {"type": device.type, "machine": platform.machine(), "isa": torch.backends.cpu.get_cpu_capability()} | (
        cpu_identity()
    )


def cpu_identity(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """The CPU model and a digest of its feature flags: packages are compiled with -march=native, so a CPU
    of the same vector ISA (AVX512, say) may still lack an instruction one uses."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return {"cpu": platform.processor()}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())  # the first processor's
    flags = " ".join(sorted(fields.get("flags", "").split()))
    flags_digest = hashlib.sha256(flags.encode()).hexdigest()
    return {"cpu": fields.get("model name", platform.processor()), "cpu_flags": flags_digest}


def tensors_digest(module: nn.Module) -> str:
    """SHA-256 of every parameter and buffer (names, dtypes, shapes, strides, bytes) as they are now."""
    digest = hashlib.sha256()
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)} {tensor.stride()}\n".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def code_digest(module: nn.Module) -> str:
    """SHA-256 of the source files that define the module's own classes (torch's: its version)."""
    digest = hashlib.sha256()
    files = {inspect.getfile(type(m)) for m in module.modules() if not type(m).__module__.startswith("torch.")}
    for path in sorted(files):
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


class AheadOfTime:
    """One model's packages, on one device with one set of options: keys, compile, load, check."""

    def __init__(self, module: nn.Module, artifact: Artifact, options: RuntimeOptions, cache: CompileCache) -> None:
        spec = artifact.config.input
        self.module, self.artifact, self.options, self.cache = module, artifact, options, cache
        self.device, self.mode = options.device, options.mode
        self.label = f"{artifact.config.name}-v{artifact.config.version}"
        self.input_shape = (spec.height, spec.width, spec.channels)
        self.cuda_graphs = uses_cuda_graphs(self.device, self.mode)
        self.key_fields = {
            "format": FORMAT,
            "model": self.label,
            "architecture": artifact.config.architecture.model_dump(),
            "weights_sha256": tensors_digest(module),
            "code_sha256": code_digest(module),
            "input": {"dtype": "uint8", "shape_nhwc": list(self.input_shape), "mean": spec.mean, "std": spec.std},
            "precision": precision_name(options.dtype),
            "channels_last": options.channels_last,
            "mode": self.mode,  # with torch's version, it gives inductor's options (inductor_configs)
            "freezing": self.device.type == "cpu",
            "device": device_identity(self.device),
            # CPU kernels are compiled for the intra-op threads of the compiling process (one: no OpenMP).
            **({"cpu_threads": torch.get_num_threads()} if self.device.type == "cpu" else {}),
            "torch": torch.__version__,
            "torch_git": torch.version.git_version,
        }

    def key(self, bucket: int) -> CacheKey:
        return CacheKey(f"{self.label}-b{bucket}", {**self.key_fields, "bucket": bucket})

    def cached(self, buckets: list[int]) -> dict[int, Package]:
        """The checked packages the cache holds for ``buckets`` (a bad one is discarded, and missing)."""
        packages = {}
        for bucket in buckets:
            key = self.key(bucket)
            if (path := self.cache.lookup(key)) is None:
                continue
            try:
                packages[bucket] = Package(self.load(path, bucket), "cache")
            except Exception as exc:  # a package that cannot serve is never fatal: compiled again
                self.cache.discard(key, f"cannot serve: {exc}")
        return packages

    def fill_in_background(self, buckets: list[int], jobs: int) -> subprocess.Popen[bytes] | None:
        """Start compiling ``buckets`` into the cache in a background process (lowest CPU priority, with
        ``jobs`` processes in all): None where the packages could not be kept or the model cannot be
        read from its store as it is here."""
        if not self.cache.writable:
            self.cache.warn_read_only()
            return None
        if not same_on_disk(self.artifact):
            log.warning("%s: not in its store as loaded; no packages compiled for it", self.label)
            return None
        names = tuple(str(self.cache.entry(self.key(b))) for b in buckets)
        with _filling_lock:  # instances of one model warm up at once, on threads of their own
            if (running := _filling.get(names)) is not None and running.poll() is None:
                return None  # another instance of this model started it
            log.info("%s: compiling the packages of buckets %s in the background", self.label, buckets)
            command = [*self._precompile_command(buckets, jobs), "--background"]
            _filling[names] = process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        return process

    def _precompile_command(self, buckets: list[int], jobs: int) -> list[str]:
        """``python -m service.precompile`` for ``buckets`` of this model, device and options, a child of
        this process (it ends when this one does)."""
        return [
            *(sys.executable, "-m", "service.precompile", str(self.artifact.path)),
            *("--device", str(self.device), "--precision", precision_name(self.options.dtype)),
            *("--compile-mode", self.mode, "--buckets", ",".join(map(str, buckets))),
            *("--cache", str(self.cache.root), "--jobs", str(jobs), "--parent", str(os.getpid())),
            *("--cpu-threads", str(torch.get_num_threads())),
            "--channels-last" if self.options.channels_last else "--no-channels-last",
        ]

    def packages(self, buckets: list[int], jobs: int = 1) -> dict[int, Package]:
        """A checked package for every bucket: loaded where the cache has it, else compiled and stored.
        A bucket another process is compiling is waited for, while this one compiles the others;
        with ``jobs`` > 1, helper processes compile some of the missing buckets meanwhile."""
        keys = {b: self.key(b) for b in buckets}
        missing = [b for b in buckets if not self.cache.entry(keys[b]).exists()]
        helpers = self._start_helpers(missing, jobs)
        packages: dict[int, Package] = {}
        try:
            while pending := [b for b in buckets if b not in packages]:
                for bucket in pending:
                    if (package := self._package(bucket, keys[bucket])) is not None:
                        packages[bucket] = package
                if len(packages) < len(buckets) and not any(b in packages for b in pending):
                    time.sleep(POLL_S)  # every bucket left is another process's for now
        finally:
            stop(helpers)
        return packages

    def _package(self, bucket: int, key: CacheKey) -> Package | None:
        """The bucket's package, from the cache or compiled (and stored); None while another process
        holds its key."""
        with self.cache.claim(key) as mine:
            if not mine:
                return None
            if (path := self.cache.lookup(key)) is not None:
                try:
                    return Package(self.load(path, bucket), "cache")
                except Exception as exc:  # a package that cannot serve is never fatal: compiled again
                    self.cache.discard(key, f"cannot serve: {exc}")
            return self._compile(bucket, key)

    def _compile(self, bucket: int, key: CacheKey) -> Package:
        with self.cache.workspace(key) as workspace:
            started = time.perf_counter()
            example = torch.zeros((bucket, *self.input_shape), dtype=torch.uint8, device=self.device)
            configs = inductor_configs(self.device, self.mode)
            with _compiling, torch.no_grad():
                program = torch.export.export(self.module, (example,))
                torch._inductor.aoti_compile_and_package(
                    program, package_path=str(workspace / PACKAGE_FILE), inductor_configs=configs
                )
            seconds = time.perf_counter() - started
            forward = self.load(workspace / PACKAGE_FILE, bucket)  # checked before it is kept (the loader copies it)
            stored = self.cache.store(key, workspace, compile_s=round(seconds, 2))
        log.info(
            "%s: bucket %d compiled ahead of time in %.1f s%s",
            self.label,
            bucket,
            seconds,
            f", kept in {stored.parent}" if stored else " (not kept)",
        )
        return Package(forward, "compiled")

    def load(self, path: Path, bucket: int) -> Forward:
        """The package at ``path`` as a forward for batches of ``bucket``, checked against the eager module."""
        forward: Forward
        if self.device.type == "cpu" and CpuPackage.serves(path):
            forward = CpuPackage(path)
        else:
            index = -1 if self.device.type == "cpu" else self.device.index or 0
            # run_single_threaded: without the runtime's own thread bookkeeping, which a CUDA graph capture
            # refuses. Holding the GIL matters little here: a CUDA forward only queues its kernels.
            loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", self.cuda_graphs, 1, index)

            def forward(batch: torch.Tensor) -> torch.Tensor:
                return loader.run([batch])[0]

        self.check(forward, bucket)
        return CudaGraphed(forward, self.probe(bucket)) if self.cuda_graphs else forward

    def probe(self, bucket: int) -> torch.Tensor:
        rng = np.random.default_rng(bucket)
        return torch.from_numpy(rng.integers(0, 256, (bucket, *self.input_shape), dtype=np.uint8)).to(self.device)

    @torch.inference_mode()
    def check(self, forward: Forward, bucket: int) -> None:
        """PackageError unless ``forward`` answers a probe batch as the eager module does."""
        batch = self.probe(bucket)
        got = forward(batch)[:PROBE_ROWS].float()
        expected = self.module(batch[:PROBE_ROWS]).float()
        if got.shape != expected.shape:
            raise PackageError(f"bucket {bucket}: output {tuple(got.shape)}, eager {tuple(expected.shape)}")
        difference = float((got - expected).abs().max())
        if not difference <= TOLERANCE.get(self.options.dtype, 5e-2) * max(1.0, float(expected.abs().max())):
            raise PackageError(f"bucket {bucket}: logits differ from the eager model's by {difference:.3g}")

    def _start_helpers(self, missing: list[int], jobs: int) -> list[subprocess.Popen[bytes]]:
        """``jobs - 1`` helper processes compiling the missing buckets too (from the largest, each from
        another one), when there are several, the cache is writable and the model can be read from its
        store as it is here."""
        count = min(jobs, len(missing)) - 1
        if count < 1 or not self.cache.writable or not same_on_disk(self.artifact):
            return []
        largest_first = sorted(missing, reverse=True)
        helpers = []
        for i in range(count):
            start = i * len(largest_first) // count
            order = largest_first[start:] + largest_first[:start]
            helpers.append(subprocess.Popen(self._precompile_command(order, 1), stdin=subprocess.DEVNULL))
        log.info("%s: %d helper process(es) compiling buckets %s too", self.label, count, largest_first)
        return helpers


class CpuPackage:
    """A CPU package's model, called through the C functions every AOTInductor library exports, with
    ctypes, which lets go of the GIL while the forward runs (the pybind loader keeps it). Its output is
    a tensor of its own; the batch's tensor is only read."""

    def __init__(self, path: Path) -> None:
        self.lib = _library(path)
        container, outputs = ctypes.c_void_p(), ctypes.c_size_t()
        _call(self.lib.AOTInductorModelContainerCreateWithDevice, ctypes.byref(container), 1, b"cpu", None)
        weakref.finalize(self, self.lib.AOTInductorModelContainerDelete, container)  # frees its buffers
        _call(self.lib.AOTInductorModelContainerGetNumOutputs, container, ctypes.byref(outputs))
        if outputs.value != 1:
            raise PackageError(f"{path}: {outputs.value} outputs, one expected")
        self.container = container

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        (handle,) = torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors([batch])  # a new reference, stolen
        inputs = (ctypes.c_void_p * 1)(_capsule_pointer(handle, None))
        output = (ctypes.c_void_p * 1)()
        _call(self.lib.AOTInductorModelContainerRun, self.container, inputs, 1, output, 1, None, None)
        return torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs([_capsule(output[0], None, None)])[0]

    @staticmethod
    def serves(path: Path) -> bool:
        """Whether the package needs nothing but its library: one with a proxy executor's JSON (ops
        without a C shim) needs torch's loader."""
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        return not any(n.endswith(".json") and not n.endswith("_metadata.json") for n in names if "/aotinductor/" in n)


_libraries: dict[str, ctypes.CDLL] = {}  # by the library's sha256: a reload creates containers, maps nothing
_libraries_lock = threading.Lock()


def _library(path: Path) -> ctypes.CDLL:
    """The package's shared library, loaded once per process from an anonymous memory file: no temporary
    file, and it loads where /tmp is mounted noexec (Docker's --tmpfs is). It stays mapped for the
    process's life: its C++ unique symbols make the dynamic loader ignore dlclose anyway."""
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.endswith(".so")]
        if len(names) != 1:
            raise PackageError(f"{path}: {len(names)} shared libraries, one expected")
        code = archive.read(names[0])
    digest = hashlib.sha256(code).hexdigest()
    with _libraries_lock:
        if (lib := _libraries.get(digest)) is None:
            # Its descriptor stays open: the dynamic loader takes a path it has loaded before for the same
            # library, and a closed descriptor's number (so its /proc path) comes back for the next one.
            fd = os.memfd_create(f"igcv2-aot-{digest[:12]}.so", os.MFD_CLOEXEC)
            with open(fd, "wb", closefd=False) as memory:
                memory.write(code)
            lib = ctypes.CDLL(f"/proc/self/fd/{fd}")
            for name, arguments in _ENTRY_POINTS.items():
                function = getattr(lib, name)
                function.argtypes, function.restype = arguments, ctypes.c_int32
            _libraries[digest] = lib
    return lib


_POINTER = ctypes.POINTER(ctypes.c_void_p)
_ENTRY_POINTS = {  # AOTInductor's C interface (torch/csrc/inductor/aoti_runtime/interface.h)
    "AOTInductorModelContainerCreateWithDevice": [_POINTER, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_char_p],
    "AOTInductorModelContainerGetNumOutputs": [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)],
    "AOTInductorModelContainerRun": [
        *(ctypes.c_void_p, _POINTER, ctypes.c_size_t, _POINTER, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p)
    ],
    "AOTInductorModelContainerDelete": [ctypes.c_void_p],
}
_capsule_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi)
)  # torch hands tensor handles out, and takes them back, as capsules
_capsule = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)(
    ("PyCapsule_New", ctypes.pythonapi)
)


def _call(function: Any, *arguments: object) -> None:
    if (code := function(*arguments)) != 0:
        raise RuntimeError(f"{function.__name__} failed ({code}); AOTInductor logged why")


class CudaGraphed:
    """A package replayed as a CUDA graph (what reduce-overhead gives torch.compile): one launch per batch.

    The graph reads its static input and writes its static output: each call copies the batch in, and
    the output is overwritten by the next call (ModelRunner.predict copies it to the host before that).
    UNMEASURED: no GPU on the machine this was written on.
    """

    def __init__(self, forward: Forward, example: torch.Tensor) -> None:
        self.input = example.clone()
        current = torch.cuda.current_stream(example.device)
        side = torch.cuda.Stream(example.device)  # warm-up off the default stream, as torch.cuda.graph's docs ask
        side.wait_stream(current)
        with torch.inference_mode(), torch.cuda.stream(side):
            for _ in range(3):
                forward(self.input)
        current.wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph):
            self.output = forward(self.input)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.input.copy_(batch, non_blocking=True)
        self.graph.replay()
        return self.output


class ByBucket:
    """One forward for every bucket: batches are padded to a bucket, so the batch size picks the package."""

    def __init__(self, packages: dict[int, Package]) -> None:
        self.forwards = {bucket: package.forward for bucket, package in packages.items()}

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.forwards[batch.shape[0]](batch)


def same_on_disk(artifact: Artifact) -> bool:
    """Whether the artifact's version folder still holds this artifact (a helper process reads it there)."""
    try:
        return (
            read_config(artifact.path) == artifact.config
            and sha256_file(artifact.path / WEIGHTS_FILE) == artifact.config.weights_sha256
        )
    except (ArtifactError, OSError):
        return False


def stop(helpers: list[subprocess.Popen[bytes]]) -> None:
    """End compiling processes still running (they clean up after themselves on SIGTERM)."""
    for helper in helpers:
        if helper.poll() is None:
            helper.terminate()
    for helper in helpers:
        try:
            code = helper.wait(HELPER_STOP_S)
        except subprocess.TimeoutExpired:
            helper.kill()
            code = helper.wait()
        if code not in (0, -15, 143):
            log.warning("a compiling process (pid %d) exited with %s (its log says why)", helper.pid, code)
