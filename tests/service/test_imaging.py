"""Image bytes -> fitted uint8 (H, W, C): real encodings of every supported format and mode, limits, fuzzing."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, JpegImagePlugin
from samples import fashion_pngs

from igcv2.artifact import InputSpec
from igcv2.data import fit_image
from service.errors import BadInput, ServiceError, TooLarge, UnsupportedMediaType
from service.imaging import check_media_type, decode_image, open_image

SIDE = 28
GRAY = InputSpec(height=SIDE, width=SIDE, channels=1, mean=[0.5], std=[0.5])
COLOUR = InputSpec(height=SIDE, width=SIDE, channels=3, mean=[0.5] * 3, std=[0.5] * 3)
SPECS = {1: GRAY, 3: COLOUR}
LIMIT = 40_000_000


def encode(image: Image.Image, fmt: str, **save_args: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def pattern(h: int = SIDE, w: int = SIDE) -> np.ndarray:
    """A smooth RGB pattern (JPEG keeps it well) that differs along both axes and in every channel."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack(
        [x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 127 // max(h + w - 2, 1) + 64], -1
    ).astype(np.uint8)


def alpha(h: int = SIDE, w: int = SIDE) -> np.ndarray:
    a = np.full((h, w), 255, np.uint8)
    a[: h // 2, : w // 2] = 0  # fully transparent quarter
    a[h // 2 :, w // 2 :] = 128  # half transparent quarter
    return a


def on_black(rgb: np.ndarray, a: np.ndarray) -> np.ndarray:
    """What a viewer sees of an RGBA image on a black background (the documented flattening)."""
    return np.round(rgb.astype(np.float64) * (a[..., None] / 255.0)).astype(np.uint8)


def gray_of(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma, as Pillow's convert('L') computes it."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    return np.round(r * 0.299 + g * 0.587 + b * 0.114).astype(np.uint8)


def palette_image(transparent: bool = True) -> tuple[Image.Image, np.ndarray]:
    """A P image of 8 colours, index 0 transparent; returns it and the expected RGB on black."""
    colours = np.array(
        [
            [0, 0, 0],
            [255, 0, 0],
            [0, 255, 0],
            [0, 0, 255],
            [255, 255, 0],
            [0, 255, 255],
            [255, 0, 255],
            [200, 200, 200],
        ],
        np.uint8,
    )
    colours[0] = [250, 250, 250]  # the transparent index has a bright colour that must NOT show
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    index = ((x // 4 + y // 4) % 8).astype(np.uint8)
    image = Image.fromarray(index, "P")
    image.putpalette(colours.flatten().tolist())
    expected = colours[index]
    if transparent:
        image.info["transparency"] = 0
        expected[index == 0] = 0
    return image, expected


def source(mode: str, fmt: str) -> tuple[Image.Image, np.ndarray]:
    """(image in ``mode``, the RGB a viewer sees on black) for a 28x28 test picture."""
    rgb = pattern()
    if mode == "RGB":
        return Image.fromarray(rgb, "RGB"), rgb
    if mode == "RGBA":
        a = alpha()
        return Image.fromarray(np.dstack([rgb, a]), "RGBA"), on_black(rgb, a)
    if mode == "L":
        gray = gray_of(rgb)
        return Image.fromarray(gray, "L"), np.repeat(gray[..., None], 3, -1)
    if mode == "LA":
        gray, a = gray_of(rgb), alpha()
        flat = on_black(np.repeat(gray[..., None], 3, -1), a)
        return Image.fromarray(np.dstack([gray, a]), "LA"), flat
    if mode == "I;16":
        wide = rgb[..., 0].astype(np.uint16) * 257  # 16-bit full scale: 255 * 257 = 65535
        return Image.fromarray(wide), np.repeat(rgb[..., :1], 3, -1)
    if mode == "CMYK":
        cmyk = np.dstack([255 - rgb, np.zeros(rgb.shape[:2], np.uint8)])  # K = 0: exact inverse of RGB
        return Image.fromarray(cmyk, "CMYK"), rgb
    if mode == "P":
        return palette_image(transparent=fmt not in ("BMP", "TIFF"))  # their palettes have no transparency
    raise AssertionError(mode)


# (format, mode, save args, lossless)
CASES = [
    ("PNG", "L", {}, True),
    ("PNG", "RGB", {}, True),
    ("PNG", "RGBA", {}, True),
    ("PNG", "P", {}, True),
    ("PNG", "I;16", {}, True),
    ("PNG", "LA", {}, True),
    ("JPEG", "L", {"quality": 95}, False),
    ("JPEG", "RGB", {"quality": 95}, False),
    ("JPEG", "CMYK", {"quality": 95}, False),
    ("GIF", "P", {}, True),
    ("GIF", "L", {}, True),
    ("WEBP", "RGB", {"lossless": True}, True),
    ("WEBP", "RGBA", {"lossless": True, "exact": True}, True),
    ("WEBP", "RGB", {"quality": 95}, False),
    ("BMP", "L", {}, True),
    ("BMP", "RGB", {}, True),
    ("BMP", "P", {}, True),
    ("TIFF", "L", {}, True),
    ("TIFF", "RGB", {}, True),
    ("TIFF", "RGBA", {}, True),
    ("TIFF", "P", {}, True),
    ("TIFF", "I;16", {}, True),
    ("TIFF", "CMYK", {}, True),
    ("TIFF", "RGB", {"compression": "tiff_lzw"}, True),
]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(
    ("fmt", "mode", "save_args", "lossless"),
    CASES,
    ids=[f"{f}-{m}-{'lossless' if ok else 'lossy'}" for f, m, _, ok in CASES],
)
def test_formats_and_modes_decode_to_what_a_viewer_sees(
    fmt: str, mode: str, save_args: dict[str, Any], lossless: bool, channels: int
) -> None:
    image, seen = source(mode, fmt)
    data = encode(image, fmt, **save_args)
    assert Image.open(io.BytesIO(data)).format == fmt
    out = decode_image(data, SPECS[channels], LIMIT, "x")
    assert out.shape == (SIDE, SIDE, channels) and out.dtype == np.uint8
    expected = seen if channels == 3 else gray_of(seen)[..., None]
    diff = np.abs(out.astype(np.int16) - expected.astype(np.int16))
    if lossless:
        assert diff.max() <= 1, f"max difference {diff.max()}"
    else:
        assert diff.mean() < 4 and diff.max() < 40, f"mean {diff.mean():.2f}, max {diff.max()}"
    assert out.std() > 10  # not a blank picture


def test_transparent_pixels_are_black_not_their_hidden_colour() -> None:
    image, _ = palette_image()
    out = decode_image(encode(image, "PNG"), COLOUR, LIMIT)
    index = np.asarray(image)
    assert (out[index == 0] == 0).all()
    assert (out[index == 7] == 200).all()


def test_fashion_mnist_png_round_trip() -> None:
    pngs = fashion_pngs(4)
    for png in pngs:
        original = np.asarray(Image.open(io.BytesIO(png)))
        out = decode_image(png, GRAY, LIMIT)
        np.testing.assert_array_equal(out[..., 0], original)


# ----- geometry: shorter side resized, centre crop -----


def test_shorter_side_resized_then_centre_cropped() -> None:
    bands = np.zeros((SIDE, 3 * SIDE, 3), np.uint8)
    bands[:, :SIDE] = [255, 0, 0]
    bands[:, SIDE : 2 * SIDE] = [0, 255, 0]
    bands[:, 2 * SIDE :] = [0, 0, 255]
    out = decode_image(encode(Image.fromarray(bands), "PNG"), COLOUR, LIMIT)
    assert out.shape == (SIDE, SIDE, 3)
    assert (out[:, 2:-2] == [0, 255, 0]).all(), "the centre band must fill the crop"


@pytest.mark.parametrize(("h", "w"), [(1, 1), (1, 200), (300, 2), (28, 28), (500, 400)])
def test_any_size_fits_a_non_square_input(h: int, w: int) -> None:
    spec = InputSpec(height=24, width=32, channels=3, mean=[0.5] * 3, std=[0.5] * 3)
    out = decode_image(encode(Image.fromarray(pattern(h, w)), "PNG"), spec, LIMIT)
    assert out.shape == (24, 32, 3) and out.dtype == np.uint8


# ----- EXIF orientation -----


def with_orientation(image: Image.Image, fmt: str, orientation: int, **save_args: Any) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, fmt, exif=exif, **save_args)


# Orientation tag -> the transpose that makes the stored pixels upright (EXIF 2.3).
UPRIGHT = {
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_270,
    8: Image.Transpose.ROTATE_90,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
}


@pytest.mark.parametrize(
    ("fmt", "orientation"), [("PNG", 3), ("PNG", 6), ("PNG", 8), ("PNG", 2), ("JPEG", 6), ("WEBP", 8), ("TIFF", 6)]
)
def test_exif_orientation_is_applied(fmt: str, orientation: int) -> None:
    stored = Image.fromarray(pattern(SIDE, 2 * SIDE))  # landscape as stored
    args: dict[str, Any] = {"quality": 95} if fmt == "JPEG" else ({"lossless": True} if fmt == "WEBP" else {})
    out = decode_image(with_orientation(stored, fmt, orientation, **args), COLOUR, LIMIT)
    upright = decode_image(encode(stored.transpose(UPRIGHT[orientation]), "PNG"), COLOUR, LIMIT)
    ignored = decode_image(encode(stored, "PNG"), COLOUR, LIMIT)
    tolerance = 4 if fmt == "JPEG" else 1
    assert np.abs(out.astype(int) - upright.astype(int)).mean() <= tolerance
    assert np.abs(out.astype(int) - ignored.astype(int)).mean() > 20, "orientation was ignored"


# ----- animations: the first frame -----


@pytest.mark.parametrize(("fmt", "args"), [("GIF", {}), ("PNG", {}), ("WEBP", {"lossless": True})])
def test_animation_gives_its_first_frame(fmt: str, args: dict[str, Any]) -> None:
    frames = [Image.fromarray(np.full((SIDE, SIDE), value, np.uint8)).convert("RGB") for value in (40, 140, 240)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0, **args)
    opened = Image.open(io.BytesIO(data))
    assert getattr(opened, "n_frames", 1) == 3
    opened.seek(2)  # decoding must not depend on where a previous reader left the frame pointer
    out = decode_image(data, GRAY, LIMIT)
    assert np.abs(out.astype(int) - 40).max() <= 1


# ----- large JPEGs: draft() decodes at reduced scale, same picture -----


def large_photo(h: int = 2000, w: int = 3000) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x / w * 255, y / h * 255, 128 + 100 * np.sin(x / 150.0) * np.cos(y / 120.0)], -1).astype(np.uint8)
    rgb[h // 4 : 3 * h // 4, w // 3 : 2 * w // 3] = [250, 30, 30]
    return rgb


@pytest.mark.parametrize("channels", [1, 3])
def test_large_jpeg_uses_draft_and_matches_a_full_decode(monkeypatch: pytest.MonkeyPatch, channels: int) -> None:
    data = encode(Image.fromarray(large_photo()), "JPEG", quality=90)
    drafted: list[tuple[int, int]] = []
    original_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self: JpegImagePlugin.JpegImageFile, *args: Any, **kwargs: Any) -> Any:
        result = original_draft(self, *args, **kwargs)
        drafted.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    out = decode_image(data, SPECS[channels], LIMIT)
    assert drafted and drafted[0][0] <= 3000 // 8, f"draft() did not reduce the decode: {drafted}"
    assert out.shape == (SIDE, SIDE, channels)
    full = Image.open(io.BytesIO(data))
    full.load()
    reference = fit_image(full, SIDE, SIDE, channels)
    diff = np.abs(out.astype(int) - reference.astype(int))
    assert diff.mean() < 2 and diff.max() < 16, f"mean {diff.mean():.2f}, max {diff.max()}"


# ----- limits: decoded pixels (decompression bombs) -----


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` but carries almost no data (a decompression bomb's header)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("width", "height", "max_pixels"),
    [
        (100_000, 100_000, 10**9),  # over twice ours, where Pillow's own check errors instead of warning
        (8_000, 8_000, LIMIT),
        (40_001, 1_000, LIMIT),
    ],
)
def test_declared_dimensions_over_the_limit_are_refused_before_decoding(
    width: int, height: int, max_pixels: int
) -> None:
    with pytest.raises(TooLarge, match=f"the limit of {max_pixels}"):
        decode_image(png_header_only(width, height), GRAY, max_pixels, "bomb.png")


def test_a_limit_above_pillows_default_is_ours_not_pillows() -> None:
    header = png_header_only(10_000, 9_500)  # 95M pixels: over Pillow's default bomb limit of 89.5M
    assert open_image(header, GRAY, 100_000_000).size == (10_000, 9_500)
    with pytest.raises(TooLarge, match="95000000 pixels exceeds the limit of 90000000"):
        open_image(header, GRAY, 90_000_000)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"])
def test_real_image_over_the_pixel_limit(fmt: str) -> None:
    data = encode(Image.fromarray(pattern(100, 120)), fmt)
    with pytest.raises(TooLarge, match="12000 pixels exceeds the limit of 11999"):
        decode_image(data, GRAY, 11_999, "big")
    assert decode_image(data, GRAY, 12_000).shape == (SIDE, SIDE, 1)  # the limit itself is allowed


# ----- undecodable input -----


def truncated(data: bytes, fraction: float) -> bytes:
    return data[: int(len(data) * fraction)]


JPEG = encode(Image.fromarray(pattern(64, 64)), "JPEG")
PNG = encode(Image.fromarray(pattern(64, 64)), "PNG")

BAD = {
    "empty": b"",
    "text": b"hello, world",
    "png signature then garbage": b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 10,
    "truncated png": truncated(PNG, 0.5),
    "png without its data": truncated(PNG, 0.1),
    "truncated jpeg": truncated(JPEG, 0.5),
    "jpeg header only": JPEG[:200],
    "gif header only": b"GIF89a\x10\x00\x10\x00",
    "eps (never handed to ghostscript)": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
    "ico (not a supported format)": encode(Image.fromarray(pattern(16, 16)), "ICO"),
    "ppm (not a supported format)": encode(Image.fromarray(pattern(16, 16)), "PPM"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_undecodable_input_is_bad_input(case: str) -> None:
    with pytest.raises(BadInput) as info:
        decode_image(BAD[case], GRAY, LIMIT, "upload.bin")
    assert info.value.status_code == 400
    assert info.value.message.startswith("upload.bin: ")


# ----- declared media type -----


@pytest.mark.parametrize(
    "content_type",
    [
        "image/png",
        "image/jpeg",
        "IMAGE/WEBP",
        "image/gif; charset=binary",
        "image/x-anything",
        "application/octet-stream",
        "",
        None,
    ],
)
def test_accepted_media_types(content_type: str | None) -> None:
    check_media_type(content_type)


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/json",
        "application/pdf",
        "video/mp4",
        "text/plain; charset=utf-8",
        "multipart/form-data",
    ],
)
def test_refused_media_types(content_type: str) -> None:
    with pytest.raises(UnsupportedMediaType) as info:
        check_media_type(content_type)
    assert info.value.status_code == 415
    assert content_type.split(";")[0] in info.value.message


# ----- properties -----

DECODE_ERRORS = (BadInput, TooLarge, UnsupportedMediaType)


def decode_or_refuse(data: bytes, spec: InputSpec, max_pixels: int) -> np.ndarray | None:
    """Decode, or return None when refused with a documented error; anything else fails the test."""
    try:
        out = decode_image(data, spec, max_pixels)
    except DECODE_ERRORS as exc:
        assert isinstance(exc, ServiceError) and exc.message
        return None
    assert out.shape == (spec.height, spec.width, spec.channels) and out.dtype == np.uint8
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=4096), channels=st.sampled_from([1, 3]))
def test_arbitrary_bytes_raise_only_documented_errors(data: bytes, channels: int) -> None:
    decode_or_refuse(data, SPECS[channels], 1_000_000)


SEEDS = {
    fmt: encode(Image.fromarray(pattern(20, 24)).convert(mode), fmt)
    for fmt, mode in [("PNG", "RGB"), ("JPEG", "RGB"), ("GIF", "P"), ("WEBP", "RGB"), ("BMP", "RGB"), ("TIFF", "RGB")]
}


@pytest.mark.filterwarnings("ignore:.*:UserWarning:PIL")  # Pillow warns about the broken TIFF tags it skips
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fmt=st.sampled_from(sorted(SEEDS)),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
    cut=st.one_of(st.none(), st.integers(0, 10_000)),
    channels=st.sampled_from([1, 3]),
)
def test_corrupted_real_images_raise_only_documented_errors(
    fmt: str, edits: list[tuple[int, int]], cut: int | None, channels: int
) -> None:
    """Byte flips and truncations of real files reach deep into every decoder, unlike random bytes."""
    data = bytearray(SEEDS[fmt])
    for position, value in edits:
        data[position % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    decode_or_refuse(bytes(data), SPECS[channels], 1_000_000)


# Modes each format can store (what Pillow writes without converting).
WRITABLE = {
    "PNG": ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"],
    "JPEG": ["L", "RGB", "CMYK"],
    "GIF": ["1", "L", "P", "RGB"],
    "WEBP": ["RGB", "RGBA"],
    "BMP": ["1", "L", "P", "RGB"],
    "TIFF": ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"],
}


def random_image(mode: str, h: int, w: int, seed: int, transparent: bool) -> Image.Image:
    rng = np.random.default_rng(seed)
    u8 = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    if mode == "1":
        return Image.fromarray(u8[..., 0] > 127)
    if mode in ("L", "RGB", "RGBA", "CMYK", "LA"):
        bands = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4}[mode]
        return Image.fromarray(u8[..., 0] if bands == 1 else np.ascontiguousarray(u8[..., :bands]), mode)
    if mode == "P":
        image = Image.fromarray(u8[..., :3], "RGB").quantize(colors=int(rng.integers(2, 256)))
        if transparent:
            image.info["transparency"] = 0
        return image
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-(2**20), 2**20, (h, w), dtype=np.int32))
    if mode == "F":
        return Image.fromarray((rng.standard_normal((h, w)) * 300).astype(np.float32))
    raise AssertionError(mode)


@st.composite
def valid_images(draw: st.DrawFn) -> tuple[bytes, str, str]:
    fmt = draw(st.sampled_from(sorted(WRITABLE)))
    mode = draw(st.sampled_from(WRITABLE[fmt]))
    h, w = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    image = random_image(mode, h, w, draw(st.integers(0, 2**32 - 1)), draw(st.booleans()))
    return encode(image, fmt), fmt, mode


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(image=valid_images(), channels=st.sampled_from([1, 3]), height=st.integers(1, 40), width=st.integers(1, 40))
def test_every_valid_image_decodes_to_the_input_shape(
    image: tuple[bytes, str, str], channels: int, height: int, width: int
) -> None:
    data, fmt, mode = image
    spec = InputSpec(height=height, width=width, channels=channels, mean=[0.5] * channels, std=[0.5] * channels)
    out = decode_image(data, spec, 1_000_000)
    assert out.shape == (height, width, channels), (fmt, mode)
    assert out.dtype == np.uint8
