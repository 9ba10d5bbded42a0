"""Settings: IGCV2_* variables, .env, validation, and the batching precedence of DESIGN.md section 7."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from service.config import BATCHING_FIELDS, Settings, env_name, usable_cpus

SERVING = {"max_batch_size": 8, "max_queue_delay_ms": 5, "max_queue_size": 100, "request_timeout_s": 2, "instances": 2}


def settings(**kwargs: Any) -> Settings:
    return Settings(_env_file=None, **kwargs)


def test_defaults() -> None:
    s = settings()
    assert s.model_store == Path("model_store")
    assert s.models == [] and s.wanted_models() == []
    assert (s.device, s.precision, s.compile, s.compile_mode) == ("auto", "auto", True, "auto")
    assert s.aot is True and s.compile_cache == Path(".compile-cache")
    assert (s.max_batch_size, s.max_queue_delay_ms, s.max_queue_size) == (32, 0.0, 256)
    assert s.api_key is None and s.admin_key is None
    assert (s.host, s.port) == ("127.0.0.1", 8000)
    assert Settings.model_fields["grpc_port"].default == 8001  # Triton's (the tests' environment says 0: off)


def test_grpc_needs_a_port_of_its_own() -> None:
    with pytest.raises(ValidationError, match="IGCV2_GRPC_PORT and IGCV2_PORT are both 9000"):
        Settings(_env_file=None, port=9000, grpc_port=9000)
    assert Settings(_env_file=None, port=9000, grpc_port=0).grpc_port == 0


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("IGCV2_MODEL_STORE", str(tmp_path))
    monkeypatch.setenv("IGCV2_COMPILE", "false")
    monkeypatch.setenv("IGCV2_MAX_QUEUE_DELAY_MS", "2.5")
    monkeypatch.setenv("IGCV2_API_KEY", "s3cret-key")
    monkeypatch.setenv("IGCV2_PRECISION", "bfloat16")
    s = settings()
    assert s.model_store == tmp_path
    assert s.compile is False
    assert s.max_queue_delay_ms == 2.5
    assert s.precision == "bfloat16"
    assert s.api_key is not None and s.api_key.get_secret_value() == "s3cret-key"
    assert "s3cret-key" not in repr(s) and "s3cret-key" not in str(s.model_dump())


def test_dotenv_file_is_read_and_environment_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("IGCV2_PORT=9001\nIGCV2_MAX_BATCH_SIZE=4\n")
    monkeypatch.setenv("IGCV2_MAX_BATCH_SIZE", "2")
    s = Settings(_env_file=dotenv)
    assert s.port == 9001
    assert s.max_batch_size == 2
    # A value from .env is the operator's word too: it beats the model's serving section.
    assert s.batching_for(SERVING)["max_batch_size"] == 2


def test_env_name() -> None:
    assert env_name("max_batch_size") == "IGCV2_MAX_BATCH_SIZE"
    for field in BATCHING_FIELDS:
        assert field in Settings.model_fields


# ----- batching precedence: defaults < serving section < explicit IGCV2_* -----


def test_batching_defaults_without_serving_section() -> None:
    s = settings()
    assert s.batching_for({}) == {name: getattr(s, name) for name in BATCHING_FIELDS}


def test_serving_section_overrides_defaults() -> None:
    merged = settings().batching_for(SERVING)
    assert merged == SERVING
    assert isinstance(merged["max_queue_delay_ms"], float) and isinstance(merged["max_batch_size"], int)


def test_serving_section_refuses_other_settings() -> None:
    """Neither a setting only the operator sets (an artifact must not choose the device or the key)
    nor a typo, which silently ignored would leave the author believing it applied."""
    for extra in ({"device": "cuda"}, {"api_key": "x"}, {"max_body_bytes": 1}, {"max_batch_sise": 4}):
        with pytest.raises(
            ValueError,
            match=f"invalid serving section in config.json: '{next(iter(extra))}' not "
            "allowed; it may set max_batch_size, ",
        ):
            settings().batching_for({**SERVING, **extra})


def test_explicit_environment_beats_serving_section(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IGCV2_MAX_BATCH_SIZE", "1")  # turns batching off for every model
    monkeypatch.setenv("IGCV2_MAX_QUEUE_SIZE", "256")  # explicitly the default: still the operator's word
    merged = settings().batching_for(SERVING)
    assert merged["max_batch_size"] == 1
    assert merged["max_queue_size"] == 256
    assert merged["max_queue_delay_ms"] == 5.0 and merged["instances"] == 2 and merged["request_timeout_s"] == 2.0


def test_explicit_constructor_argument_beats_serving_section() -> None:
    assert settings(max_queue_delay_ms=0).batching_for(SERVING)["max_queue_delay_ms"] == 0.0


@pytest.mark.parametrize(
    "serving",
    [
        {"max_batch_size": 0},
        {"max_batch_size": 4096},
        {"max_batch_size": "many"},
        {"max_batch_size": 2.5},
        {"max_queue_size": 0},
        {"max_queue_delay_ms": -1},
        {"request_timeout_s": 0},
        {"instances": 0},
    ],
)
def test_invalid_serving_section_is_rejected(serving: dict[str, Any]) -> None:
    """An artifact cannot sneak in a value the operator could not set (e.g. a batch of 0)."""
    field = next(iter(serving))
    with pytest.raises(ValueError, match=field):
        settings().batching_for(serving)


# ----- IGCV2_MODELS -----


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", []),
        ("a", [("a", None)]),
        ("a, b:3", [("a", None), ("b", 3)]),
        (" igcv2-fashion:2 ,, other.model ", [("igcv2-fashion", 2), ("other.model", None)]),
        ("m:2,m:1,m", [("m", 2), ("m", 1), ("m", None)]),  # several versions of one model, side by side
        ("m:1,m:1,m,m", [("m", 1), ("m", None)]),
    ],
)
def test_wanted_models(monkeypatch: pytest.MonkeyPatch, value: str, expected: list[tuple[str, int | None]]) -> None:
    monkeypatch.setenv("IGCV2_MODELS", value)
    assert settings().wanted_models() == expected


def test_models_as_a_list() -> None:
    assert settings(models=["a", "b:3"]).wanted_models() == [("a", None), ("b", 3)]
    with pytest.raises(ValidationError, match="models"):
        settings(models=["a\n"])  # a list is not stripped, and "$" would match before the newline


@pytest.mark.parametrize(
    "value", ["a:x", "a:0", "a:-1", "a:1.5", "../x", "a/b:1", ":3", "a:\u0663", "a:01", "a:" + "9" * 30]
)  # an Arabic-Indic 3, a leading 0, 30 digits
def test_invalid_models_are_rejected(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("IGCV2_MODELS", value)
    with pytest.raises(ValidationError, match="models"):
        settings()


# ----- invalid values -----


@pytest.mark.parametrize("name", ["IGCV2_API_KEY", "IGCV2_ADMIN_KEY"])
@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_key_is_refused_not_taken_as_no_key(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    """IGCV2_API_KEY=${KEY} with KEY unset would otherwise leave every route open without a word."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match="must not be empty or blank"):
        settings()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("IGCV2_MAX_BATCH_SIZE", "0"),
        ("IGCV2_MAX_BATCH_SIZE", "2000"),
        ("IGCV2_MAX_BATCH_SIZE", "abc"),
        ("IGCV2_MAX_QUEUE_DELAY_MS", "-1"),
        ("IGCV2_MAX_QUEUE_SIZE", "0"),
        ("IGCV2_REQUEST_TIMEOUT_S", "0"),
        ("IGCV2_INSTANCES", "0"),
        ("IGCV2_MAX_BODY_BYTES", "10"),
        ("IGCV2_MAX_IMAGE_PIXELS", "0"),
        ("IGCV2_PORT", "0"),
        ("IGCV2_PORT", "70000"),
        ("IGCV2_PRECISION", "float64"),
        ("IGCV2_LOG_LEVEL", "loud"),
        ("IGCV2_COMPILE", "maybe"),
        ("IGCV2_CPU_THREADS", "-2"),
        ("IGCV2_CPUS", "-1"),
        ("IGCV2_DEVICE", "gpu"),
        ("IGCV2_DEVICE", "cuda:x"),
    ],
)
def test_invalid_values_are_rejected(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    field = name.removeprefix("IGCV2_").lower()
    with pytest.raises(ValidationError, match=field):
        settings()


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:3"])
def test_valid_devices(monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    monkeypatch.setenv("IGCV2_DEVICE", device)
    assert settings().device == device


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("1", True), ("False", False), ("0", False)])
def test_boolean_spellings(monkeypatch: pytest.MonkeyPatch, value: str, expected: bool) -> None:
    monkeypatch.setenv("IGCV2_COMPILE", value)
    assert settings().compile is expected


AFFINITY = len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [
        ("max 100000\n", AFFINITY),  # no quota
        ("50000 100000\n", 1),  # half a core still gets a thread
        ("150000 100000\n", min(AFFINITY, 2)),  # docker --cpus 1.5: rounded up
        ("800000000 100000\n", AFFINITY),  # a quota above the CPUs it may run on
        ("garbage\n", AFFINITY),
        (None, AFFINITY),  # cgroup v1, or no CPU controller
    ],
)
def test_usable_cpus_honour_the_cgroup_quota(tmp_path: Path, cpu_max: str | None, expected: int) -> None:
    if cpu_max is not None:
        (tmp_path / "cpu.max").write_text(cpu_max)
    assert usable_cpus(tmp_path) == expected


def test_cores_come_from_cpus_or_what_the_process_may_use() -> None:
    assert settings(cpus=8, workers=3).cores == 2
    assert settings(cpus=2, workers=4).cores == 1  # never none
    assert settings().cores == usable_cpus()
