"""python -m service: --help lists every setting; invalid settings exit 2 with a message naming the variable."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from live_server import free_port
from uvicorn.config import STARTUP_FAILURE

from service.__main__ import main, settings_help
from service.config import Settings, env_name

ROOT = Path(__file__).resolve().parents[2]


def service_env(env: dict[str, str]) -> dict[str, str]:
    """This process's environment without the developer's IGCV2_* settings, no gRPC (Triton's port is not
    ours to take), plus ``env``."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("IGCV2_")}, "IGCV2_GRPC_PORT": "0", **env}


def run_service(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=cwd,
        env=service_env(env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_help_lists_every_setting(tmp_path: Path) -> None:
    result = run_service(["--help"], {}, tmp_path)
    assert result.returncode == 0, result.stderr
    for name, field in Settings.model_fields.items():
        assert env_name(name) in result.stdout, f"{env_name(name)} missing from --help"
        assert field.description, f"setting {name} has no description for --help"
    assert "[default: 32]" in result.stdout  # max batch size
    assert "usage: python -m service" in result.stdout


def test_help_text_has_one_line_per_setting() -> None:
    lines = [line for line in settings_help().splitlines() if line.strip().startswith("IGCV2_")]
    assert len(lines) == len(Settings.model_fields)


def test_invalid_environment_exits_2(tmp_path: Path) -> None:
    """The real entry point, before it loads any model or opens a port."""
    result = run_service([], {"IGCV2_PORT": "not-a-port", "IGCV2_MODEL_STORE": str(tmp_path)}, tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "invalid settings" in result.stderr
    assert "IGCV2_PORT" in result.stderr and "not-a-port" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("IGCV2_MAX_BATCH_SIZE", "0"),
        ("IGCV2_LOG_LEVEL", "loud"),
        ("IGCV2_MODELS", "a:x"),
        ("IGCV2_DEVICE", "gpu"),
        ("IGCV2_COMPILE", "perhaps"),
    ],
)
def test_each_invalid_setting_is_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, name: str, value: str
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env of the developer's
    monkeypatch.setenv(name, value)
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("invalid settings")
    assert name in err and value in err


def test_several_invalid_settings_are_all_reported(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IGCV2_PORT", "0")
    monkeypatch.setenv("IGCV2_PRECISION", "float64")
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "IGCV2_PORT" in err and "IGCV2_PRECISION" in err


def test_unknown_argument_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--port", "9000"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_the_gil_switch_interval_is_set_before_serving(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Measured: with CPython's 5 ms the event loop starves the inference thread between kernels."""
    from service import __main__ as entry

    seen: list[float] = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IGCV2_MODEL_STORE", str(tmp_path))
    monkeypatch.setenv("IGCV2_GIL_SWITCH_INTERVAL_MS", "2.5")
    monkeypatch.setattr(entry.Server, "run", lambda self, sockets=None: seen.append(sys.getswitchinterval()))
    original = sys.getswitchinterval()
    try:
        assert main([]) == 0
    finally:
        sys.setswitchinterval(original)
    assert seen == [pytest.approx(0.0025)]


def test_a_taken_port_exits_at_once_while_the_model_still_compiles() -> None:
    """uvicorn gives up when it cannot bind; the model loader is compiling then. The process must
    end with uvicorn's startup-failure code and message, not wait for the compile and abort
    (SIGABRT) after it."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        started = time.monotonic()
        result = run_service([], {"IGCV2_PORT": str(taken.getsockname()[1])}, ROOT)
    assert result.returncode == STARTUP_FAILURE, result.stderr[-2000:]
    assert "address already in use" in result.stderr
    # Mostly the model is compiling by then ("still loading: abandoned"); when the bind fails before the
    # loader thread registered it, the closed registry never starts it (seen once in CI: SIGABRT, before).
    assert "terminate called" not in result.stderr
    assert time.monotonic() - started < 60


def test_a_taken_grpc_port_exits_at_once(tmp_path: Path) -> None:
    """One process alone owns its gRPC port (no SO_REUSEPORT without workers): a taken one is a startup failure."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_service([], {"IGCV2_PORT": str(free_port()), "IGCV2_GRPC_PORT": str(port)}, ROOT)
    assert result.returncode == STARTUP_FAILURE, result.stderr[-2000:]
    assert f"cannot serve gRPC on 127.0.0.1:{port}" in result.stderr
    assert "terminate called" not in result.stderr


def test_sigterm_during_warm_up_exits_0_without_waiting_for_the_compile() -> None:
    """A container stopped while it warms up (a rolling update) stops at once, with success."""
    process = subprocess.Popen(
        [sys.executable, "-m", "service"],
        cwd=ROOT,
        text=True,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env=service_env({"IGCV2_PORT": str(free_port())}),
    )
    assert process.stderr is not None
    try:
        for line in process.stderr:  # uvicorn serves health probes while the model loads in a thread
            if "Uvicorn running on" in line:
                break
        process.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        _, rest = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 0, rest[-2000:]
    assert "still loading: abandoned" in rest
    assert "terminate called" not in rest
    assert time.monotonic() - stopped < 15


def test_sigterm_during_a_control_route_load_exits_0_without_waiting_for_it(tmp_path: Path) -> None:
    """The compile of a version loaded through the control route runs in a thread; a shutdown in the
    middle of it once hung for good (the version finished after the registry closed and started a
    batcher whose thread nothing stopped). The process must exit 0, promptly, abandoning the load."""
    store = tmp_path / "store"
    shutil.copytree(ROOT / "model_store" / "igcv2-fashion" / "1", store / "igcv2-fashion" / "1")
    shutil.copytree(store / "igcv2-fashion" / "1", store / "igcv2-fashion" / "2")
    config = store / "igcv2-fashion" / "2" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "version": 2}))
    port = free_port()
    env = {
        "IGCV2_PORT": str(port),
        "IGCV2_MODEL_STORE": str(store),
        "IGCV2_MODELS": "igcv2-fashion:1",
        "IGCV2_MAX_BATCH_SIZE": "2",
        "IGCV2_SHUTDOWN_TIMEOUT_S": "1",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "service"],
        cwd=tmp_path,
        text=True,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env=service_env(env),
    )
    assert process.stderr is not None
    try:
        for line in process.stderr:
            if "igcv2-fashion v1 ready" in line:
                break
        answers: list[object] = []

        def load() -> None:
            url = f"http://127.0.0.1:{port}/v2/repository/models/igcv2-fashion/load"
            try:
                with urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=60) as response:
                    answers.append(response.status)
            except OSError as exc:  # HTTPError included: the shutdown cut it off
                answers.append(exc)

        loader = threading.Thread(target=load)
        loader.start()
        for line in process.stderr:  # its compile takes seconds more (9 s here); the shutdown, 1 s
            if "igcv2-fashion v2: loading through the control route" in line:
                break
        process.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        _, rest = process.communicate(timeout=60)
        loader.join(60)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 0, rest[-2000:]
    assert time.monotonic() - stopped < 20
    assert "igcv2-fashion v2 still loading: abandoned" in rest, rest[-2000:]
    assert "terminate called" not in rest
    assert isinstance(answers[0], urllib.error.HTTPError) and answers[0].code == 503, answers


def test_a_signal_before_the_app_loads_only_asks_to_exit() -> None:
    """SIGTERM can reach a front-end while uvicorn still imports its protocols (no app yet)."""
    import uvicorn

    from service.__main__ import Server

    server = Server(uvicorn.Config("service.app:create_app", factory=True))
    server.handle_exit(signal.SIGTERM, None)
    assert server.should_exit
