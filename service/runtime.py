"""ModelRunner: one model instance on one device, fed uint8 NHWC batches from one dedicated thread.

Why it is shaped like this:
* ``torch.compile(dynamic=False)`` compiles one graph per input shape, so batches are padded to a
  few fixed buckets (1, 2, 4, ..., max) and each bucket is compiled and warmed up before the
  model reports ready: no request ever pays for a compilation.
* CUDA graphs ("reduce-overhead") belong to the thread that recorded them, and inductor's
  caches are not meant for concurrent callers, so every call, warm-up included, runs on the
  instance's single-thread executor; outputs are copied to host memory before the next call.
* The host sends uint8 (4x fewer bytes than float32) through a pinned buffer with a
  non-blocking copy; normalisation runs on the device inside the compiled graph.
* With a compile cache, the buckets are compiled ahead of time (service/aot.py): a restart loads
  them in milliseconds instead of compiling again. torch.compile is the fallback, eager the last one.
"""

from __future__ import annotations

import functools
import logging
import statistics
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from igcv2.artifact import Artifact
from igcv2.networks import Normalized
from service import aot
from service.compile_cache import CompileCache
from service.config import Settings

log = logging.getLogger("igcv2.runtime")
WARMUP_CALLS = 5
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def buckets_for(max_batch_size: int) -> list[int]:
    """Powers of two up to ``max_batch_size``, and ``max_batch_size`` itself."""
    sizes, size = [], 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return [*sizes, max_batch_size]


def inductor_options(device: torch.device) -> dict[str, bool]:
    """Inductor settings for compiling on ``device`` (benchmarks/RESULTS.md, runs E and I).

    On CPU, the C++ wrapper runs a whole graph in one call without the GIL (the default Python
    wrapper calls each fused kernel holding it), and freezing makes the weights constants of the
    graph: batch norm folds into the convolutions, oneDNN gets prepacked weights, and the graph
    takes half as many tensors per call (48 instead of 110 for igcv2-fashion), each of whose
    release needs the GIL back. Beside a busy Python thread a batch of 16 took 6.5 ms instead of 22.9.
    """
    cpu = device.type == "cpu"
    return {"cpp_wrapper": cpu, "freezing": cpu}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return device


@dataclass(frozen=True)
class RuntimeOptions:
    device: torch.device
    precision: str = "auto"  # auto | float32 | float16 | bfloat16
    compile: bool = True
    compile_mode: str = "auto"
    channels_last: bool = False  # NCHW: 1.7x faster than channels_last for the ImageNet preset on an H200
    max_batch_size: int = 32
    compile_cache: Path | None = None  # ahead-of-time packages are kept here; None: torch.compile at every start
    compile_jobs: int = 1  # processes compiling the buckets a cold cache lacks, this one included

    @property
    def dtype(self) -> torch.dtype:
        if self.precision == "auto":
            return torch.float16 if self.device.type == "cuda" else torch.float32
        return DTYPES[self.precision]

    @property
    def mode(self) -> str:
        if self.compile_mode == "auto":
            # CUDA graphs: 4x the default mode's speed at batch 1 on an H200; max-autotune took minutes per
            # bucket to compile and chose cuDNN/cuBLAS kernels anyway (benchmarks/RESULTS.md).
            return "reduce-overhead" if self.device.type == "cuda" else "default"
        return self.compile_mode


def runtime_options(settings: Settings, max_batch_size: int, device: torch.device) -> RuntimeOptions:
    """The runtime options ``settings`` give a model whose largest batch is ``max_batch_size``."""
    return RuntimeOptions(
        device=device,
        precision=settings.precision,
        compile=settings.compile,
        compile_mode=settings.compile_mode,
        channels_last=settings.channels_last,
        max_batch_size=max_batch_size,
        compile_cache=settings.compile_cache if settings.aot else None,
        compile_jobs=settings.cores,
    )


def serving_module(artifact: Artifact, options: RuntimeOptions) -> nn.Module:
    """The artifact's network behind its normalisation, on the device, in the precision, without gradients."""
    spec = artifact.config.input
    module: nn.Module = Normalized(artifact.model, spec.mean, spec.std).eval()
    module = module.to(options.device, options.dtype)
    if options.device.type == "cuda" and options.channels_last:
        module = module.to(memory_format=torch.channels_last)
    for param in module.parameters():
        param.requires_grad_(False)
    return module


class ModelRunner:
    """A model resident on its device, compiled per bucket, called from its own thread."""

    def __init__(self, artifact: Artifact, options: RuntimeOptions, name: str = "model") -> None:
        spec = artifact.config.input
        self.options = options
        self.device = options.device
        self.buckets = buckets_for(options.max_batch_size)
        self.input_shape = (spec.height, spec.width, spec.channels)
        self.num_classes = len(artifact.config.labels)
        self.executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix=f"infer-{name}",
            initializer=own_cuda_graph_trees if self.device.type == "cuda" else None,
        )
        self.artifact = artifact
        self.compiled = False
        self.packages: dict[int, str] = {}  # bucket -> where its ahead-of-time package came from (the cache)
        self.filling: subprocess.Popen[bytes] | None = None  # compiling the packages the cache lacked
        self.fill: Callable[[], subprocess.Popen[bytes] | None] | None = None  # what starts it
        self.bucket_seconds: dict[int, float] = {}  # median seconds of one call per bucket, from warm-up
        self.module = serving_module(artifact, options)
        self.forward: Callable[[torch.Tensor], torch.Tensor] = self.module
        pin = self.device.type == "cuda"
        self.host_buffers = {
            b: torch.zeros((b, *self.input_shape), dtype=torch.uint8, pin_memory=pin) for b in self.buckets
        }

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    @torch.inference_mode()
    def predict(self, images: list[np.ndarray]) -> np.ndarray:
        """Float32 logits (N, classes) for N uint8 (H, W, C) images; call on ``self.executor``."""
        n = len(images)
        if not 0 < n <= self.buckets[-1]:
            raise ValueError(f"batch of {n} images; allowed 1..{self.buckets[-1]}")
        host = self.host_buffers[self.bucket(n)]
        np.stack(images, out=host.numpy()[:n])
        batch = host.to(self.device, non_blocking=True)
        logits = self.forward(batch)[:n].float()
        return logits.cpu().numpy().copy()  # never hand out a view of a buffer the next call reuses

    @torch.inference_mode()
    def predict_normalized(self, tensors: list[np.ndarray]) -> np.ndarray:
        """Float32 logits for N already-normalised float32 (C, H, W) tensors; call on ``self.executor``.

        Runs the network without its ``Normalized`` wrapper: uint8 cannot carry these values, so
        they are not de-normalised. Eager, not compiled: compiling a second graph per bucket would
        double every model's warm-up for an input kind few clients use.
        """
        n = len(tensors)
        if not 0 < n <= self.buckets[-1]:
            raise ValueError(f"batch of {n} tensors; allowed 1..{self.buckets[-1]}")
        batch = torch.from_numpy(np.stack(tensors)).to(self.device, self.options.dtype)
        if self.device.type == "cuda" and self.options.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return self.module.network(batch).float().cpu().numpy().copy()

    def warmup(self) -> float:
        """Compile (when enabled) and run every bucket a few times; returns seconds spent.

        Call on ``self.executor``. Ahead-of-time packages first (with a compile cache); a failure
        falls back to torch.compile, and that one's to eager, loudly.
        """
        started = time.perf_counter()
        fill = None
        if self.options.compile and self.options.compile_cache is not None:
            fill = self._warm_up_ahead_of_time(self.options.compile_cache)
        if self.options.compile and not self.compiled:
            self._warm_up_compiled()
        if not self.compiled:
            self._run_buckets()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.fill = fill  # started by start_filling, once no model of this process compiles any more
        return time.perf_counter() - started

    def start_filling(self) -> None:
        """Start the background compile of the packages the cache lacked, if this start left one. Beside
        a torch.compile warm-up (this model's or another's) it would take its cores and hold inductor's
        locks on the kernels both compile: a cold start measured 1.4x slower."""
        if self.fill is not None:
            self.filling, self.fill = self.fill(), None

    def _warm_up_ahead_of_time(self, cache: Path) -> Callable[[], subprocess.Popen[bytes] | None] | None:
        """Serve the packages of the compile cache when it holds every bucket's. Otherwise this start
        compiles with torch.compile, as before (a package costs more CPU than its graph), and the
        returned call starts a background process that fills the cache for the next one."""
        started = time.perf_counter()
        try:
            compiler = aot.AheadOfTime(self.module, self.artifact, self.options, CompileCache(cache))
            packages = compiler.cached(self.buckets)
            if missing := [b for b in self.buckets if b not in packages]:
                log.info(
                    "%s: the compile cache lacks buckets %s: torch.compile serves this start", compiler.label, missing
                )
                return functools.partial(compiler.fill_in_background, missing, self.options.compile_jobs)
            self.forward = aot.ByBucket(packages)
            self._run_buckets()
        except Exception:
            log.exception("ahead-of-time packages FAILED (mode=%s); FALLING BACK TO torch.compile", self.options.mode)
            self.forward = self.module
            return None
        self.compiled, self.packages = True, {b: p.origin for b, p in packages.items()}
        log.info(
            "%s: ahead-of-time packages of buckets %s loaded from the compile cache (%.2f s)",
            compiler.label,
            ", ".join(map(str, self.buckets)),
            time.perf_counter() - started,
        )
        return None

    def _warm_up_compiled(self) -> None:
        # Here, not at the top: dynamo and inductor cost a second of every start that loads packages.
        import torch._dynamo
        import torch._inductor.config

        try:
            # Process-wide, and other runners warm up at the same time: raise it, never lower it.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(self.buckets))
            torch._dynamo.config.fail_on_recompile_limit_hit = True  # an error here, never a silent eager
            self.forward = torch.compile(own_code(self.module), mode=self.options.mode, dynamic=False)
            with torch._inductor.config.patch(**inductor_options(self.device)):
                self._run_buckets()  # compiles: dynamo compiles lazily, one graph per bucket
            self.compiled = True
        except Exception:
            log.exception("torch.compile FAILED (mode=%s); FALLING BACK TO EAGER", self.options.mode)
            self.forward = self.module

    def _run_buckets(self) -> None:
        """Run every bucket ``WARMUP_CALLS`` times and keep the median time of a call after the
        first (which compiles) in ``bucket_seconds``: the batcher sizes its batches with it."""
        blank = np.zeros(self.input_shape, np.uint8)
        for b in self.buckets:
            calls = []
            for _ in range(WARMUP_CALLS):
                started = time.perf_counter()
                self.predict([blank] * b)
                calls.append(time.perf_counter() - started)
            self.bucket_seconds[b] = statistics.median(calls[1:])

    def run(self, inputs: list[np.ndarray]) -> np.ndarray:
        """:meth:`predict` for uint8 images, :meth:`predict_normalized` for float tensors (the
        batcher never mixes the two); call on ``self.executor``."""
        return self.predict(inputs) if inputs[0].dtype == np.uint8 else self.predict_normalized(inputs)

    def close(self, wait: bool = True) -> None:
        """Stop the inference thread: after its current call, or, without ``wait``, whenever that returns;
        and the background compile, if it is still going (without ``wait``, only told to stop: this may
        run on an event loop that other requests need)."""
        if self.filling is not None:
            if wait:
                aot.stop([self.filling])
            elif self.filling.poll() is None:
                self.filling.terminate()  # it cleans up after itself on SIGTERM
        self.executor.shutdown(wait=wait)


def own_code(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``module``'s forward behind a code object of its own, for ``torch.compile``.

    Dynamo keeps its compiled graphs (one per bucket) on the code object it compiles, and
    ``recompile_limit`` counts them there: compiling ``module`` itself would pile every instance,
    version and reload of one architecture onto the same ``forward`` (graphs of unloaded models
    included), until the limit silently turned the next model eager at half speed. Here the graphs
    live and die with this runner.
    """

    def forward(images: torch.Tensor) -> torch.Tensor:
        return module(images)

    forward.__code__ = forward.__code__.replace()  # a copy: each call of own_code would share one otherwise
    return forward


def own_cuda_graph_trees() -> None:
    """Give the calling inference thread its own CUDA-graph tree manager.

    Inductor keeps them in a ``threading.local`` that torch < 2.13 fills only in the thread that
    imported ``torch._inductor.cudagraph_trees`` (and autograd's): there, a second instance, a reloaded
    model or any thread that was not first failed an assertion and silently served eager (seen on
    an H200 with torch 2.11). torch 2.13 does the same itself; this keeps older hosts working.
    """
    from torch._inductor import cudagraph_trees

    if not hasattr(cudagraph_trees.local, "tree_manager_containers"):
        cudagraph_trees.local.tree_manager_containers = {}
        cudagraph_trees.local.tree_manager_locks = defaultdict(threading.Lock)


def configure_cpu_threads(settings: Settings) -> None:
    """Intra-op threads for CPU inference: :attr:`Settings.inference_threads`, a core fewer than the
    process's share. Packages are compiled for that many (their kernels' thread count is fixed then).

    The HTTP loop, decoding and the inference thread share one GIL; leaving them a core beats a
    second OpenMP thread that spins between batches (benchmarks/RESULTS.md: +18% saturation
    throughput and a 5x lower p99 at concurrency 32 on 2 cores, same single-image latency).
    """
    torch.set_num_threads(settings.inference_threads)
