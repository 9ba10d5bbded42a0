"""Hostile input against the real server: every malformed file, form and request gets its
documented 4xx with a JSON message (or, for a valid image in an unusual shape, the same answer the
model library gives for it), and the server keeps serving after each one.

The corpus is generated here from one Fashion-MNIST test image (no binary fixtures). Limits of the
server under test: 1,000,000 pixels, 2,000,000 body bytes, 12 images per request.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
from e2e.reliability import assert_serving, error_message, fast_env, http_request, metric, raw_request
from live_server import LiveServer, live_server
from PIL import Image
from samples import default_model_store, fashion_test_images

from igcv2.data import fit_image

MAX_PIXELS = 1_000_000
MAX_BODY = 2_000_000
MAX_IMAGES = 12
HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    tmp_path = tmp_path_factory.mktemp("hostile")
    env = fast_env(
        default_model_store(tmp_path),
        max_image_pixels=str(MAX_PIXELS),
        max_body_bytes=str(MAX_BODY),
        max_images_per_request=str(MAX_IMAGES),
        header_timeout_s=str(HEADER_TIMEOUT_S),
        body_timeout_s=str(BODY_TIMEOUT_S),
    )
    with live_server(tmp_path, env) as running:
        yield running


# ----- the corpus -----

GRAY = Image.fromarray(fashion_test_images(1)[0][0][..., 0])  # 28x28 L: the reference picture
ROTATED = GRAY.transpose(Image.Transpose.ROTATE_90)  # stored sideways; EXIF orientation 6 puts it upright


def encode(image: Image.Image, fmt: str, **args: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **args)
    return buffer.getvalue()


def orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    exif[0x010F] = "igcv2"  # Make
    return exif


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height: the classic decompression bomb (a few
    hundred bytes of zlib would inflate to the full picture)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 65536, 9)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def patched(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


def jpeg_declaring(width: int, height: int) -> bytes:
    data = encode(GRAY, "JPEG")
    sof = data.index(b"\xff\xc0")
    return patched(data, sof + 5, struct.pack(">HH", height, width))


def gif_declaring(width: int, height: int) -> bytes:
    return patched(encode(GRAY, "GIF"), 6, struct.pack("<HH", width, height))


def bmp_declaring(width: int, height: int) -> bytes:
    return patched(encode(GRAY, "BMP"), 18, struct.pack("<ii", width, height))


def webp_declaring(width: int, height: int) -> bytes:
    data = encode(GRAY.convert("RGB"), "WEBP", lossless=True, exif=orientation(1))  # exif: a VP8X header
    vp8x = data.index(b"VP8X")
    return patched(data, vp8x + 12, (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little"))


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def scrambled(data: bytes, keep: int) -> bytes:
    """Header kept, payload overwritten with a fixed pseudo-random pattern."""
    noise = np.random.default_rng(7).integers(0, 256, len(data) - keep, np.uint8).tobytes()
    return data[:keep] + noise


def animated(fmt: str) -> bytes:
    frames = [GRAY.convert("RGB"), Image.new("RGB", (28, 28), (255, 255, 255)), Image.new("RGB", (28, 28))]
    args = {"lossless": True} if fmt == "WEBP" else {}
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **args)


def with_alpha(mode: str) -> bytes:
    image = GRAY.convert(mode)
    alpha = Image.new("L", (28, 28), 255)
    alpha.paste(0, (0, 0, 14, 28))  # the left half transparent: flattened onto black
    image.putalpha(alpha)
    return encode(image, "PNG")


def broken_exif_jpeg() -> bytes:
    """An EXIF block whose Make tag is renumbered to SubIFDs (a LONG tag) while keeping its ASCII
    value: Pillow reads it, then fails re-serialising it when it applies the orientation."""
    data = encode(GRAY, "JPEG", exif=orientation(6))
    return data.replace(struct.pack(">HH", 0x010F, 2), struct.pack(">HH", 0x014A, 2), 1)


SIXTEEN_BIT = Image.fromarray(np.asarray(GRAY, np.uint16) * 257)
CMYK = GRAY.convert("RGB").convert("CMYK")
PNG = encode(GRAY, "PNG")

# Valid images in every unusual shape: answered 200, exactly as the library's own decode would be.
VALID: dict[str, bytes] = {
    "png gray": PNG,
    "png rgb": encode(GRAY.convert("RGB"), "PNG"),
    "png palette": encode(GRAY.convert("P"), "PNG"),
    "png gray+alpha": with_alpha("L"),
    "png rgba": with_alpha("RGB"),
    "png palette with transparency": encode(GRAY.convert("P"), "PNG", transparency=0),
    "png 16-bit": encode(SIXTEEN_BIT, "PNG"),
    "png 1-bit": encode(GRAY.convert("1"), "PNG"),
    "png interlaced": encode(GRAY, "PNG", optimize=False, interlace=1),
    "png exif orientation 6": encode(ROTATED, "PNG", exif=orientation(6)),
    "jpeg exif orientation 6": encode(ROTATED, "JPEG", quality=95, exif=orientation(6)),
    "jpeg cmyk": encode(CMYK, "JPEG", quality=95),
    "jpeg progressive": encode(GRAY, "JPEG", progressive=True),
    "gif": encode(GRAY, "GIF"),
    "gif animated": animated("GIF"),
    "webp lossless": encode(GRAY.convert("RGB"), "WEBP", lossless=True),
    "webp animated": animated("WEBP"),
    "bmp": encode(GRAY, "BMP"),
    "tiff 16-bit": encode(SIXTEEN_BIT, "TIFF"),
    "1x1 png": encode(Image.new("L", (1, 1), 200), "PNG"),
    "wide 2000x20 png": encode(Image.new("L", (2000, 20), 99), "PNG"),
}

# (data, content type declared, expected status)
INVALID: dict[str, tuple[bytes, str, int]] = {
    "zero bytes": (b"", "image/png", 400),
    "text declared as png": (b"just some words\n" * 10, "image/png", 400),
    "html declared as png": (
        b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>",
        "image/png",
        400,
    ),
    "html as text/html": (b"<html></html>", "text/html", 415),
    "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="28" height="28"/>', "image/svg+xml", 400),
    "eps (never handed to ghostscript)": (
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\nshowpage\n",
        "image/x-eps",
        400,
    ),
    "pdf": (encode(GRAY.convert("RGB"), "PDF"), "application/pdf", 415),
    "pdf declared as png": (encode(GRAY.convert("RGB"), "PDF"), "image/png", 400),
    "ico (unsupported format)": (encode(GRAY, "ICO"), "image/x-icon", 400),
    "png truncated": (truncated(PNG), "image/png", 400),
    "jpeg truncated": (truncated(encode(GRAY, "JPEG")), "image/jpeg", 400),
    "gif truncated": (truncated(encode(GRAY, "GIF")), "image/gif", 400),
    "webp truncated": (truncated(encode(GRAY.convert("RGB"), "WEBP")), "image/webp", 400),
    "bmp truncated": (truncated(encode(GRAY, "BMP")), "image/bmp", 400),
    "tiff truncated": (truncated(encode(GRAY, "TIFF")), "image/tiff", 400),
    "png corrupt payload": (scrambled(PNG, 41), "image/png", 400),
    "jpeg corrupt payload": (scrambled(encode(GRAY, "JPEG"), 200), "image/jpeg", 400),
    "gif corrupt payload": (scrambled(encode(GRAY, "GIF"), 40), "image/gif", 400),
    "webp corrupt header": (patched(encode(GRAY.convert("RGB"), "WEBP"), 12, b"VP9 "), "image/webp", 400),
    "bmp corrupt header": (patched(encode(GRAY, "BMP"), 28, struct.pack("<H", 7)), "image/bmp", 400),
    "jpeg broken exif": (broken_exif_jpeg(), "image/jpeg", 400),
    "png bomb 100000x100000": (png_declaring(100_000, 100_000), "image/png", 413),
    "png bomb 2000x2000": (png_declaring(2000, 2000), "image/png", 413),
    "png 1x400000 strip (fits to 11M pixels)": (png_declaring(1, 400_000), "image/png", 413),
    "png 0x0": (png_declaring(0, 0), "image/png", 400),
    "jpeg declaring 60000x60000": (jpeg_declaring(60_000, 60_000), "image/jpeg", 413),
    "gif declaring 65535x65535": (gif_declaring(65_535, 65_535), "image/gif", 413),
    "bmp declaring 50000x50000": (bmp_declaring(50_000, 50_000), "image/bmp", 413),
    "bmp declaring 50000x-50000": (bmp_declaring(50_000, -50_000), "image/bmp", 413),
    "webp declaring 16384x16384": (webp_declaring(16_384, 16_384), "image/webp", 413),
}


def classify_one(server: LiveServer, data: bytes, content_type: str | None, how: str) -> httpx.Response:
    with server.client() as client:
        if how == "multipart":
            part = ("x.img", data, content_type) if content_type else ("x.img", data)
            return client.post("/classify", params={"top_k": 10}, files=[("file", part)])
        headers = {"content-type": content_type} if content_type else {}
        return client.post("/classify", params={"top_k": 10}, content=data, headers=headers)


def probabilities(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    out = np.zeros(10)
    for p in response.json()["results"][0]["predictions"]:
        out[p["class_id"]] = p["score"]
    return out


def library_png(data: bytes) -> bytes:
    """What the model library makes of ``data`` (igcv2.data.fit_image), as a plain gray PNG."""
    with Image.open(io.BytesIO(data)) as image:
        return encode(Image.fromarray(fit_image(image, 28, 28, 1)[..., 0]), "PNG")


@pytest.mark.parametrize("how", ["multipart", "raw"])
@pytest.mark.parametrize("case", list(VALID))
def test_valid_images_in_unusual_shapes_get_the_library_answer(server: LiveServer, case: str, how: str) -> None:
    data = VALID[case]
    served = probabilities(classify_one(server, data, "image/png" if how == "raw" else None, how))
    expected = probabilities(classify_one(server, library_png(data), "image/png", "raw"))
    np.testing.assert_allclose(served, expected, atol=1e-6)
    assert abs(served.sum() - 1) < 1e-6


def test_exif_orientation_is_applied(server: LiveServer) -> None:
    """The sideways PNG with orientation 6 answers like the upright picture, not like its pixels."""
    upright = probabilities(classify_one(server, PNG, "image/png", "raw"))
    tagged = probabilities(classify_one(server, VALID["png exif orientation 6"], "image/png", "raw"))
    sideways = probabilities(classify_one(server, encode(ROTATED, "PNG"), "image/png", "raw"))
    np.testing.assert_allclose(tagged, upright, atol=1e-6)
    assert np.abs(sideways - upright).max() > 1e-5, "the model cannot tell the two apart: the check proves nothing"


@pytest.mark.parametrize("how", ["multipart", "raw"])
@pytest.mark.parametrize("case", list(INVALID))
def test_malformed_images_get_documented_errors(server: LiveServer, case: str, how: str) -> None:
    data, content_type, status = INVALID[case]
    message = error_message(classify_one(server, data, content_type, how), status)
    if status == 413:
        assert f"{MAX_PIXELS}" in message, message  # the server's own limit, not Pillow's
    assert_serving(server)


@pytest.mark.parametrize(
    ("content_type", "how", "status"),
    [
        (None, "multipart", 200),  # a part without a type: decoded if it is an image
        ("application/octet-stream", "multipart", 200),
        ("application/octet-stream", "raw", 200),
        ("image/jpeg", "raw", 200),  # declared JPEG, sent PNG: the bytes decide
        ("IMAGE/PNG; charset=binary", "raw", 200),
        (None, "raw", 415),
        ("text/html", "multipart", 415),
        ("application/json", "multipart", 415),
        ("application/x-www-form-urlencoded", "raw", 415),
        ("multipart/mixed; boundary=x", "raw", 415),
        ("video/mp4", "raw", 415),
    ],
)
def test_declared_content_types(server: LiveServer, content_type: str | None, how: str, status: int) -> None:
    response = classify_one(server, PNG, content_type, how)
    if status == 200:
        assert response.status_code == 200, response.text
    else:
        error_message(response, status)
    assert_serving(server)


# ----- malformed multipart and HTTP, byte for byte -----

PART = (
    b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
    + PNG
    + b"\r\n"
)
FORM = "multipart/form-data; boundary=B"


def form(body: bytes, content_type: str = FORM) -> bytes:
    return http_request("POST", "/classify", body, {"Content-Type": content_type})


@dataclass(frozen=True)
class Raw:
    request: bytes
    statuses: tuple[int, ...]
    json: bool = True  # False: uvicorn refuses it at the HTTP layer, before the app, in plain text


RAW: dict[str, Raw] = {
    "well-formed (control)": Raw(form(PART + b"--B--\r\n"), (200,)),
    "multipart without boundary": Raw(form(PART + b"--B--\r\n", "multipart/form-data"), (400,)),
    "multipart with the wrong boundary": Raw(form(PART + b"--B--\r\n", "multipart/form-data; boundary=C"), (400,)),
    "multipart unterminated": Raw(form(PART), (400,)),
    "multipart cut inside a part header": Raw(form(PART[:60]), (400,)),
    "multipart empty": Raw(form(b""), (400,)),
    "multipart garbage": Raw(form(bytes(range(256)) * 8), (400,)),
    "part without content-disposition": Raw(
        form(b"--B\r\nContent-Type: image/png\r\n\r\n" + PNG + b"\r\n--B--\r\n"), (400,)
    ),
    "file part sent as a text field": Raw(
        form(b'--B\r\nContent-Disposition: form-data; name="file"\r\n\r\nabc\r\n--B--\r\n'), (400,)
    ),
    "3000 file parts": Raw(form(PART * 3000 + b"--B--\r\n"), (413,)),
    "3000 text fields": Raw(
        form(b'--B\r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n' * 3000 + b"--B--\r\n"), (413,)
    ),
    "13 images (limit 12)": Raw(form(PART * 13 + b"--B--\r\n"), (413,)),
    "5000 headers in one part": Raw(
        form(PART.replace(b"\r\n\r\n", b"\r\n" + b"X-A: b\r\n" * 5000 + b"\r\n", 1) + b"--B--\r\n"), (400, 413)
    ),
    "500 kB filename": Raw(form(PART.replace(b'"a.png"', b'"' + b"a" * 500_000 + b'"', 1) + b"--B--\r\n"), (400, 413)),
    "body over the limit (content-length)": Raw(
        http_request("POST", "/classify", b"\0" * (MAX_BODY + 1), {"Content-Type": "image/png"}), (413,)
    ),
    "body over the limit (chunked)": Raw(
        b"POST /classify HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: image/png\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + (b"100000\r\n" + b"\0" * 0x100000 + b"\r\n") * 3 + b"0\r\n\r\n",
        (413,),
    ),
    "malformed chunk": Raw(
        b"POST /classify HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: image/png\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        (400,),
        json=False,
    ),
    "content-length not a number": Raw(
        b"POST /classify HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: ten\r\n\r\n", (400,), json=False
    ),
    "two content-lengths": Raw(
        b"POST /classify HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 1\r\n"
        b"Content-Length: 9999999\r\n\r\nx",
        (400,),
        json=False,
    ),
    # IGCV2_MAX_HEADER_BYTES (64 KiB): 431 for long heads, 414 where the request target alone is too long
    "header of 1 MB": Raw(http_request("GET", "/models", headers={"X-Long": "a" * 1_000_000}), (431,)),
    "10000 headers": Raw(http_request("GET", "/models", headers={f"X-{i}": "b" for i in range(10_000)}), (431,)),
    "headers of 60 kB (under the limit)": Raw(http_request("GET", "/models", headers={"X-Long": "a" * 60_000}), (200,)),
    "query string of 100 kB": Raw(http_request("GET", "/models?x=" + "a" * 100_000), (414,)),
    "model name of 100 kB": Raw(
        http_request("POST", "/classify?model=" + "a" * 100_000, PNG, {"Content-Type": "image/png"}), (414,)
    ),
    "20000 query parameters": Raw(
        http_request(
            "POST", "/classify?" + "&".join(f"top_k={i}" for i in range(20_000)), PNG, {"Content-Type": "image/png"}
        ),
        (414,),
    ),
    "model name of 10 kB": Raw(
        http_request("POST", "/classify?model=" + "a" * 10_000, PNG, {"Content-Type": "image/png"}), (404,)
    ),
    # Found by review: each of these was a 500 (plain text from the shedding layer, or "internal error")
    "version '²' (a digit to str.isdigit)": Raw(
        http_request("POST", "/classify?version=%C2%B2", PNG, {"Content-Type": "image/png"}), (422,)
    ),
    "version of 5000 digits": Raw(
        http_request("POST", "/classify?version=" + "1" * 5000, PNG, {"Content-Type": "image/png"}), (422,)
    ),
    "v2 infer, version of 5000 digits": Raw(
        http_request(
            "POST",
            "/v2/models/igcv2-fashion/versions/" + "1" * 5000 + "/infer",
            b"{}",
            {"Content-Type": "application/json"},
        ),
        (400, 404, 422),
    ),
    "v2 metadata, version of 5000 digits": Raw(
        http_request("GET", "/v2/models/igcv2-fashion/versions/" + "1" * 5000), (404, 422)
    ),
    "v2 JSON integer of 5000 digits": Raw(
        http_request(
            "POST",
            "/v2/models/igcv2-fashion/infer",
            b'{"id": ' + b"1" * 5000 + b"}",
            {"Content-Type": "application/json"},
        ),
        (400,),
    ),
    "v2 timeout of 10^30 microseconds": Raw(
        http_request(
            "POST",
            "/v2/models/igcv2-fashion/infer",
            b'{"parameters": {"timeout": 1' + b"0" * 30 + b'}, "inputs": []}',
            {"Content-Type": "application/json"},
        ),
        (400,),
    ),
    "repository index with a 5000-digit integer": Raw(
        http_request(
            "POST", "/v2/repository/index", b'{"ready": ' + b"1" * 5000 + b"}", {"Content-Type": "application/json"}
        ),
        (400,),
    ),
    "gzip body": Raw(
        http_request(
            "POST",
            "/v2/repository/index",
            gzip.compress(b'{"ready": true}'),
            {"Content-Type": "application/json", "Content-Encoding": "gzip"},
        ),
        (200,),
    ),
    "gzip body with bytes after its end": Raw(
        http_request(
            "POST",
            "/v2/repository/index",
            gzip.compress(b'{"ready": true}') + b"junk",
            {"Content-Type": "application/json", "Content-Encoding": "gzip"},
        ),
        (400,),
    ),
    "model given twice (FastAPI takes the last)": Raw(
        http_request("POST", "/classify?model=nosuch&model=igcv2-fashion", PNG, {"Content-Type": "image/png"}), (200,)
    ),
    "NUL in the model name": Raw(
        http_request("POST", "/classify?model=%00", PNG, {"Content-Type": "image/png"}), (404,)
    ),
    "top_k of 30 digits": Raw(
        http_request("POST", "/classify?top_k=" + "9" * 30, PNG, {"Content-Type": "image/png"}), (422,)
    ),
    "version of 30 digits": Raw(
        http_request("POST", "/classify?version=" + "9" * 30, PNG, {"Content-Type": "image/png"}), (404, 422)
    ),
    "X-Request-Timeout nan": Raw(
        http_request("POST", "/classify", PNG, {"Content-Type": "image/png", "X-Request-Timeout": "nan"}), (422,)
    ),
    "X-Request-Timeout -1": Raw(
        http_request("POST", "/classify", PNG, {"Content-Type": "image/png", "X-Request-Timeout": "-1"}), (422,)
    ),
    "unknown method": Raw(
        b"BREW /classify HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", (400, 405, 501), json=False
    ),
    "TLS hello on the plain port": Raw(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64), (400,), json=False),
    "not HTTP at all": Raw(b"\x00\xff" * 512 + b"\r\n\r\n", (400,), json=False),
}


@pytest.mark.parametrize("case", list(RAW))
def test_malformed_requests_get_documented_errors(server: LiveServer, case: str) -> None:
    spec = RAW[case]
    response = raw_request(server, spec.request)
    assert response.status in spec.statuses, (case, response.head[:300], response.body[:300])
    if response.status != 200 and (spec.json or response.status != 400):
        assert b"application/json" in response.head.lower(), response.head
        assert b'"error"' in response.body, response.body[:300]
    assert_serving(server)


def test_slow_body_does_not_block_other_clients(server: LiveServer) -> None:
    """A client that promises a body and never sends it holds one connection, not the server."""
    host, port = server.url.removeprefix("http://").split(":")
    stalled = []
    try:
        for _ in range(4):
            sock = socket.create_connection((host, int(port)), timeout=10)
            sock.sendall(
                b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                b"Content-Length: 100000\r\n\r\n" + PNG[:50]
            )
            stalled.append(sock)
        for _ in range(3):
            assert_serving(server)
    finally:
        for sock in stalled:
            sock.close()
    assert_serving(server)
    deadline = time.monotonic() + 10  # the server notices the four departures, and counts them apart from 5xx
    while metric(server, "igcv2_requests_total", code="499") < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(server, "igcv2_requests_total", code="499") >= 4


def connect(server: LiveServer) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=HEADER_TIMEOUT_S + 10)


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_a_head_trickling_in_gets_408_after_the_header_timeout(server: LiveServer) -> None:
    """Slowloris: a client sending its request line and headers a little at a time holds nothing for long."""
    refused_before = metric(server, "igcv2_requests_total", code="408")
    with connect(server) as sock:
        sock.sendall(b"GET /models HTTP/1.1\r\nHost: x\r\nX-Slow: a")
        started = time.monotonic()
        for _ in range(3):  # still sending, but never finishing
            time.sleep(0.3)
            sock.sendall(b"a")
        answer = read_until_closed(sock)
        waited = time.monotonic() - started
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and b"application/json" in head, answer[:300]
    assert f"not complete after {HEADER_TIMEOUT_S:g} s" in json.loads(body)["error"]
    assert HEADER_TIMEOUT_S - 0.2 < waited < HEADER_TIMEOUT_S + 3
    assert metric(server, "igcv2_requests_total", code="408") == refused_before + 1
    assert_serving(server)


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(server: LiveServer) -> None:
    with connect(server) as sock:
        started = time.monotonic()
        assert read_until_closed(sock) == b""
        assert HEADER_TIMEOUT_S - 0.2 < time.monotonic() - started < HEADER_TIMEOUT_S + 3


def test_the_head_limit_applies_to_each_request_on_a_kept_alive_connection(server: LiveServer) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /models HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while b"\r\n\r\n" not in first or len(first.partition(b"\r\n\r\n")[2]) < int(
            re.search(rb"content-length: (\d+)", first.lower()).group(1)
        ):  # type: ignore[union-attr]
            first += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200"), first[:300]
        sock.sendall(b"GET /models HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 200_000 + b"\r\n\r\n")
        second = read_until_closed(sock)
    assert second.startswith(b"HTTP/1.1 431"), second[:300]
    assert "the limit for the request line and headers together is 65536 bytes" in second.decode()
    assert_serving(server)


def read_answer(sock: socket.socket) -> bytes:
    """One whole response (head and Content-Length body) from a kept-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < int(
        re.search(rb"content-length: (\d+)", data.lower()).group(1)
    ):  # type: ignore[union-attr]
        chunk = sock.recv(65536)
        assert chunk, f"closed mid-answer: {data[:300]!r}"
        data += chunk
    return data


def test_a_second_head_trickling_in_on_a_kept_alive_connection_gets_408(server: LiveServer) -> None:
    """The head timer counts the read that starts a kept-alive connection's next head, so a stalled
    second head is answered 408 like a first one, not closed as a connection that sent nothing."""
    with connect(server) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_answer(sock).startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /models HTTP/1.1\r\nHost: x\r\n")
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert f"not complete after {HEADER_TIMEOUT_S:g} s" in answer.decode()


def test_a_refused_body_trickling_in_is_cut_off_after_the_body_timeout(server: LiveServer) -> None:
    """A body answered before it was read (413 on its Content-Length) is read and dropped by the
    server; a client trickling it, each byte restarting uvicorn's keep-alive timer, would hold the
    connection forever: it gets the body timeout in all."""
    with connect(server) as sock:
        sock.sendall(
            f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            f"Content-Length: {MAX_BODY + 1}\r\n\r\n".encode()
            + PNG[:10]
        )
        assert read_answer(sock).startswith(b"HTTP/1.1 413")
        answered = time.monotonic()
        sock.settimeout(0.4)
        closed = False
        while not closed and time.monotonic() - answered < BODY_TIMEOUT_S + 4:
            try:
                sock.sendall(b"x")
                closed = sock.recv(1) == b""
            except TimeoutError:
                continue
            except OSError:  # reset: closed while this byte was on its way
                closed = True
        assert closed, "the connection stayed open"
        assert BODY_TIMEOUT_S - 0.5 < time.monotonic() - answered < BODY_TIMEOUT_S + 3
    assert_serving(server)


def test_a_refused_body_sent_whole_leaves_the_connection_to_the_keep_alive_timeout(server: LiveServer) -> None:
    """Once the rest of a body answered early is in, the connection idles like after any answer and
    is closed after uvicorn's keep-alive timeout (5 s), not held open for good."""
    with connect(server) as sock:
        sock.sendall(
            f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            f"Content-Length: {MAX_BODY + 1}\r\n\r\n".encode()
        )
        assert read_answer(sock).startswith(b"HTTP/1.1 413")
        sock.sendall(b"x" * (MAX_BODY + 1))
        sent = time.monotonic()
        assert read_until_closed(sock) == b""
        assert time.monotonic() - sent < 5 + 3


def test_an_early_answer_to_expect_100_continue_closes_the_connection(server: LiveServer) -> None:
    """No 100 Continue came, so the client may never send the body: the connection closes after the
    answer, or the client's next request would be read as the rest of this body."""
    with connect(server) as sock:
        sock.sendall(
            f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nExpect: 100-continue\r\n"
            f"Content-Length: {MAX_BODY + 1}\r\n\r\n".encode()
        )
        started = time.monotonic()
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert time.monotonic() - started < 1.5


def test_a_pipelined_upload_is_not_cut_off_as_a_refused_one(server: LiveServer) -> None:
    """A request pipelined behind another is not one answered before its body: its slow but steady
    body (each pause under the body timeout, longer than it in all) is read and answered."""
    body = PNG
    request = (
        f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with connect(server) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n" + request)
        assert read_answer(sock).startswith(b"HTTP/1.1 200")
        pieces = [body[i : i + len(body) // 4 + 1] for i in range(0, len(body), len(body) // 4 + 1)]
        for piece in pieces:
            time.sleep(BODY_TIMEOUT_S / 2)  # 4-5 pauses: longer than the body timeout in all
            sock.sendall(piece)
        answer = read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]


def test_a_head_starting_in_the_read_that_ends_a_large_body_is_not_refused(server: LiveServer) -> None:
    """The read that ends a body may carry the next head's start: its body bytes are not that head's."""
    junk = b"x" * 100_000
    with connect(server) as sock:
        sock.sendall(
            f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(junk)}\r\n\r\n".encode()
            + junk
            + b"GET /health/live HTTP/1.1\r\nHo"
        )
        time.sleep(0.5)
        sock.sendall(b"st: x\r\n\r\n")
        first, second = read_answer(sock), read_answer(sock)
    assert first.startswith(b"HTTP/1.1 400") and second.startswith(b"HTTP/1.1 200"), (first[:200], second[:200])


def test_the_deadline_runs_from_the_head_so_a_slow_upload_counts(server: LiveServer) -> None:
    """X-Request-Timeout is the client's whole budget: a body that took longer than it to arrive is
    not computed (504), though each pause stayed under the body timeout."""
    head = (
        f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nX-Request-Timeout: 1\r\n"
        f"Content-Length: {len(PNG)}\r\n\r\n"
    ).encode()
    with connect(server) as sock:
        sock.sendall(head + PNG[:10])
        time.sleep(1.5)
        sock.sendall(PNG[10:])
        answer = read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 504"), answer[:300]
    assert "1 of 1 images never reached the model" in answer.decode()


def stalled_body(content_type: str, body: bytes) -> tuple[bytes, int]:
    """A /classify head promising ``body``, and the part of it sent before the stall."""
    head = (
        f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body[: len(body) // 2], len(body) // 2


@pytest.mark.parametrize("shape", ["raw", "multipart"])
def test_a_body_that_stalls_gets_408_after_the_body_timeout(server: LiveServer, shape: str) -> None:
    """Slowloris on the body: a client that sends its head and part of its body, then nothing,
    gets a JSON 408 once the body has paused for the timeout, and its connection is closed."""
    if shape == "raw":
        request, sent = stalled_body("image/png", PNG)
    else:
        boundary = "stall"
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
                f"Content-Type: image/png\r\n\r\n"
            ).encode()
            + PNG
            + f"\r\n--{boundary}--\r\n".encode()
        )
        request, sent = stalled_body(f"multipart/form-data; boundary={boundary}", body)
    refused_before = metric(server, "igcv2_requests_total", endpoint="/classify", code="408")
    with connect(server) as sock:
        sock.sendall(request)
        started = time.monotonic()
        answer = read_until_closed(sock)  # the server closes: the rest of this body is not awaited
        waited = time.monotonic() - started
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and b"application/json" in head, answer[:300]
    assert json.loads(body)["error"] == (
        f"request body stalled: nothing received for {BODY_TIMEOUT_S:g} s after {sent} bytes"
    )
    assert BODY_TIMEOUT_S - 0.2 < waited < BODY_TIMEOUT_S + 3
    assert metric(server, "igcv2_requests_total", endpoint="/classify", code="408") == refused_before + 1
    assert_serving(server)


def test_a_slow_but_steady_body_is_not_timed_out(server: LiveServer) -> None:
    """The body timeout bounds a pause, not the whole upload: a body arriving in pieces over more
    than the timeout, each pause shorter than it, is answered as usual."""
    request, _ = stalled_body("image/png", PNG)
    head_end = request.index(b"\r\n\r\n") + 4
    pieces = [request[:head_end], *(PNG[i : i + len(PNG) // 5 + 1] for i in range(0, len(PNG), len(PNG) // 5 + 1))]
    with connect(server) as sock:
        started = time.monotonic()
        for piece in pieces:
            sock.sendall(piece)
            time.sleep(BODY_TIMEOUT_S / 4)
        sock.shutdown(socket.SHUT_WR)  # Connection: close, in effect; the answer then ends with the stream
        answer = read_until_closed(sock)
    assert time.monotonic() - started > BODY_TIMEOUT_S  # longer than the timeout in all
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer[:300]
    assert json.loads(body)["results"][0]["predictions"]


def test_server_survived_the_whole_corpus(server: LiveServer) -> None:
    """Runs last in this module: no answer of any test above was a 5xx, nothing raised unhandled."""
    assert_serving(server)
    assert metric(server, "igcv2_requests_total", code="500") == 0
    assert metric(server, "igcv2_requests_total", endpoint="/classify") > 200
    log = server.log()
    assert "Traceback" not in log and "unhandled error" not in log, log[-3000:]
