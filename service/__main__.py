"""python -m service: serve the model store with uvicorn (uvloop + httptools, with limits on request heads).

Settings come from IGCV2_* environment variables (or .env); --help lists them. With IGCV2_WORKERS > 1
this process supervises that many front-ends on one port and one model executor (service/workers.py,
service/executor).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn
from pydantic import ValidationError

from service.config import Settings, env_name
from service.workers import EXECUTOR, RUN_DIR, Supervisor, Worker, follow_parent

if TYPE_CHECKING:
    from service.catalog import Catalog


class Server(uvicorn.Server):
    """uvicorn, plus: on SIGTERM/SIGINT flag the app as draining so new requests get 503."""

    def handle_exit(self, sig: int, frame: object) -> None:
        app = getattr(self.config, "loaded_app", None)  # None while a signal arrives before the app loads
        while app is not None and not hasattr(app, "state"):
            app = getattr(app, "app", None)
        if app is not None:
            app.state.draining = True
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn re-raises the caught SIGTERM after its graceful shutdown, so the process ends
        "killed by SIGTERM" (exit -15, 143 in a shell). A drained shutdown is a success: exit 0."""
        with super().capture_signals():
            yield
            self._captured_signals.clear()


def settings_help() -> str:
    lines = ["settings (environment variables):"]
    for name, field in Settings.model_fields.items():
        default = field.default_factory() if field.default_factory else field.default
        lines.append(f"  {env_name(name):<28} {field.description or ''} [default: {default}]")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description=__doc__.splitlines()[0],
        epilog=settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # INDEX:SOCKET_FD:SUPERVISOR_PID:REPLACEMENT
    parser.add_argument("--executor", help=argparse.SUPPRESS)  # SUPERVISOR_PID:REPLACEMENT:RUN_DIR
    args = parser.parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        problems = "\n".join(  # name the variable the operator set, not the Python field
            f"  {env_name(str(e['loc'][0])) if e['loc'] else 'settings'}: {e['msg']} (got {e.get('input')!r})"
            for e in exc.errors()
        )
        print(f"invalid settings:\n{problems}", file=sys.stderr)
        return 2
    who = f" [worker {args.worker.split(':')[0]}]" if args.worker else " [executor]" if args.executor else ""
    logging.basicConfig(
        level=settings.log_level.upper(), format=f"%(asctime)s %(levelname)s{who} %(name)s: %(message)s"
    )
    if args.executor:
        return execute(settings, args.executor)
    if settings.workers > 1 and not args.worker:
        return Supervisor(settings).run()
    return serve(settings, args.worker)


def execute(settings: Settings, role: str) -> int:
    """Run the model executor of a supervisor ``SUPERVISOR_PID:REPLACEMENT:RUN_DIR`` (service/executor)."""
    from service.executor import server
    from service.runtime import configure_cpu_threads

    supervisor, replacement, run_dir = role.split(":", 2)
    follow_parent(int(supervisor))
    me = Worker(EXECUTOR, int(supervisor), Path(run_dir), bool(int(replacement)))
    configure_cpu_threads(settings)  # the cores the front-ends' event loops leave: one each
    sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)
    abandon_loading(server.run(settings, me).registry, 0)
    return 0


def serve(settings: Settings, worker: str | None) -> int:
    """Run one server: alone on its own socket, or as worker ``INDEX:SOCKET_FD:SUPERVISOR_PID:REPLACEMENT``."""
    # Here, not at the top: a supervisor never needs torch, the models or the app (~300 MB).
    from service.app import create_app
    from service.http_protocol import bounded_http

    sockets, me = None, None
    if worker:  # a front-end: its models are the executor's, and it never imports torch
        index, fd, supervisor, replacement = map(int, worker.split(":"))
        follow_parent(supervisor)
        sockets = [socket.socket(fileno=fd)]
        me = Worker(index, supervisor, Path(os.environ[RUN_DIR]), bool(replacement))
    else:
        from service.runtime import configure_cpu_threads

        configure_cpu_threads(settings)
    # A compiled forward releases and retakes the GIL dozens of times; each time the busy event loop may
    # keep it for a whole switch interval. CPython's 5 ms cost 28% of saturation (benchmarks/RESULTS.md).
    sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)
    app = create_app(settings, me)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=bounded_http(settings.max_header_bytes, settings.header_timeout_s, settings.body_timeout_s),
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout_s),  # int seconds; never round 0.5 down to 0
    )
    try:
        Server(config).run(sockets=sockets)
    except SystemExit as exc:  # how uvicorn ends when it cannot start, e.g. when its port is taken
        abandon_loading(app.state.registry, exc.code if isinstance(exc.code, int) else 1)
        raise
    abandon_loading(app.state.registry, 0)
    return 0


def abandon_loading(registry: Catalog, code: int) -> None:
    """Exit with ``code`` at once if models are still compiling, or still computing past the shutdown
    timeout (a hung device call): nothing waits for them.

    A normal exit would wait for them (executor threads are joined at exit: a compilation takes a
    minute on 2 cores, a hung call forever), then abort the process, a C++ thread torn down under it
    ("terminate called", SIGABRT).
    """
    busy = [f"{name} still loading" for name in registry.loading()]
    busy += [f"{name} still computing" for name in registry.still_computing()]
    if busy:
        logging.getLogger("igcv2").warning("exiting while %s: abandoned", ", ".join(busy))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
