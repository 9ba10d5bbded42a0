"""Engine.decode: small images on the event loop, large ones in the decode threads, same pixels."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prometheus_client import REGISTRY

from igcv2.artifact import InputSpec
from service.config import Settings
from service.engine import Engine, Upload
from service.errors import BadInput, TooLarge
from service.imaging import decode_image
from service.registry import ModelRegistry

SPEC = InputSpec(height=28, width=28, channels=1, mean=[0.5], std=[0.25])
LIMIT = 100_000


def png(side: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    settings = Settings(model_store=tmp_path, decode_threads=1, inline_decode_pixels=64 * 64, max_image_pixels=LIMIT)
    engine = Engine(settings, ModelRegistry(settings))
    yield engine
    engine.close()


def block_pool(engine: Engine) -> threading.Event:
    """Occupy the single decode thread until the returned event is set."""
    release = threading.Event()
    engine.decode_pool.submit(release.wait, 10)
    return release


async def decode(engine: Engine, *files: bytes) -> np.ndarray:
    out = np.zeros((len(files), SPEC.height, SPEC.width, SPEC.channels), np.uint8)
    await engine.decode(SPEC, "m", [Upload(f"f{i}", "image/png", f) for i, f in enumerate(files)], out)
    return out


def test_small_images_decode_on_the_loop_large_ones_wait_for_a_decode_thread(engine: Engine) -> None:
    small, large = png(28), png(200)

    async def scenario() -> None:
        release = block_pool(engine)
        try:
            # The only decode thread is busy: a small image must not need it...
            [out] = await asyncio.wait_for(decode(engine, small), 5)
            np.testing.assert_array_equal(out, decode_image(small, SPEC, LIMIT))
            # ...a large one must, so it waits until the thread is free.
            pending = asyncio.ensure_future(decode(engine, small, large))
            await asyncio.sleep(0.3)
            assert not pending.done()
        finally:
            release.set()
        first, second = await asyncio.wait_for(pending, 5)
        np.testing.assert_array_equal(first, decode_image(small, SPEC, LIMIT))
        np.testing.assert_array_equal(second, decode_image(large, SPEC, LIMIT))

    asyncio.run(scenario())


def test_zero_inline_pixels_sends_every_image_to_the_threads(tmp_path: Path) -> None:
    settings = Settings(model_store=tmp_path, decode_threads=1, inline_decode_pixels=0)
    engine = Engine(settings, ModelRegistry(settings))

    async def scenario() -> None:
        release = block_pool(engine)
        pending = asyncio.ensure_future(decode(engine, png(28)))
        await asyncio.sleep(0.3)
        assert not pending.done()
        release.set()
        await asyncio.wait_for(pending, 5)

    try:
        asyncio.run(scenario())
    finally:
        engine.close()


def decoded_count() -> float:
    return REGISTRY.get_sample_value("igcv2_preprocess_duration_seconds_count", {"model": "m"}) or 0.0


def test_header_errors_come_before_any_decoding(engine: Engine) -> None:
    """Limits are checked from every header on the loop, before any image of the request is decoded:
    no thread is needed to refuse a request, and its valid images are not decoded for nothing."""
    too_big = png(400)  # 160,000 pixels, over the limit of 100,000
    before = decoded_count()

    async def scenario() -> None:
        release = block_pool(engine)
        try:
            with pytest.raises(TooLarge, match="f1: 400x400 = 160000 pixels"):
                await asyncio.wait_for(decode(engine, png(200), too_big), 5)
            with pytest.raises(BadInput, match="f1: not a decodable image"):
                await asyncio.wait_for(decode(engine, png(28), b"not an image"), 5)
        finally:
            release.set()
        await asyncio.sleep(0.3)  # anything handed to the pool would run now

    asyncio.run(scenario())
    assert decoded_count() == before


def test_repository_index_skips_folders_that_are_not_model_names(engine: Engine) -> None:
    for name in ("m", "m\n", ".hidden"):
        (engine.registry.store / name / "1").mkdir(parents=True)
    assert [e["name"] for e in engine.repository_index()] == ["m"]
