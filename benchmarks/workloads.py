"""What the benchmark sends and which model answers: real images, request bodies, model stores.

* ``fashion``: the served default model ``igcv2-fashion`` fed real Fashion-MNIST test images as
  PNG. While the bundled store has no version yet (training still running), an untrained model
  of the same builder is written to the output folder instead: speed does not depend on weights.
* ``imagenet``: the ``igcv2_imagenet`` 1.0 preset at 224x224 with random weights, written to the
  output folder's store as ``igcv2-imagenet-untrained`` (config ``untrained: true``; never put in
  ``model_store/``), fed real photographs from ``skimage.data`` as JPEG.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.loadgen import Body

ROOT = Path(__file__).resolve().parents[1]
BUNDLED_STORE = ROOT / "model_store"
BOUNDARY = "igcv2-benchmark-boundary"
# Colour photographs shipped inside scikit-image (no download needed).
PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "stereo_motorcycle",
)
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CONFIG_FILE = "config.json"


def versions(model_dir: Path) -> list[int]:
    """Version folders of a model, ascending: igcv2.artifact.versions without importing torch here
    (the orchestrator stays small; only the ceiling and the servers load torch)."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0)


@dataclass(frozen=True)
class Workload:
    model: str
    store: Path
    images: list[Path]  # encoded image files, one real image each
    content_type: str


def encode(array: np.ndarray, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array).save(
        buffer, format=fmt, **options
    )
    return buffer.getvalue()


def fashion_pngs(n: int) -> list[tuple[str, bytes]]:
    """The first ``n`` Fashion-MNIST test images as PNG, named by index and class."""
    from igcv2.data import load_dataset

    data = load_dataset("fashion-mnist", "test").subset(n)
    return [
        (f"fashion-{i:03d}-{data.classes[int(label)].replace('/', '-').replace(' ', '_')}.png", encode(img, "PNG"))
        for i, (img, label) in enumerate(zip(data.images, data.labels, strict=True))
    ]


def photo_jpegs(n: int, size: tuple[int, int] | None = None) -> list[tuple[str, bytes]]:
    """Up to ``n`` of scikit-image's sample photographs as JPEG (quality 90), at their own sizes or
    resized to ``size`` (width, height)."""
    import skimage.data

    out = []
    for name in PHOTOS[:n]:
        image = getattr(skimage.data, name)()
        image = np.ascontiguousarray((image[0] if isinstance(image, tuple) else image)[..., :3])  # stereo: (l, r, d)
        if size is not None:
            image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))
        out.append((f"{name}.jpg", encode(image, "JPEG", quality=90)))
    return out


def write_images(images: list[tuple[str, bytes]], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in images:
        (folder / name).write_bytes(data)
        paths.append(folder / name)
    return paths


def untrained_fashion(store: Path) -> Path:
    """An untrained ``igcv2-fashion`` in ``store`` (kept between runs): same network, random weights."""
    from igcv2.artifact import save_artifact
    from igcv2.data import FASHION_MNIST_LABELS
    from igcv2.networks import build

    if not versions(store / "igcv2-fashion"):
        save_artifact(
            build("igcv2_fashion"),
            store / "igcv2-fashion",
            name="igcv2-fashion",
            architecture={"builder": "igcv2_fashion", "kwargs": {}},
            labels=FASHION_MNIST_LABELS,
            input_spec={"height": 28, "width": 28, "channels": 1, "mean": [0.286], "std": [0.353]},
            untrained=True,
        )
    return store


def untrained_imagenet(store: Path, name: str = "igcv2-imagenet-untrained") -> Path:
    """The ImageNet 1.0 preset with random (seeded) weights, marked untrained; kept between runs."""
    import torch

    from igcv2.artifact import save_artifact
    from igcv2.networks import PRESETS, build

    if not versions(store / name):
        builder, kwargs, (channels, height, width) = PRESETS["imagenet-1.0"]
        torch.manual_seed(0)
        save_artifact(
            build(builder, **kwargs),
            store / name,
            name=name,
            architecture={"builder": builder, "kwargs": kwargs},
            labels=[f"untrained-{i:04d}" for i in range(1000)],
            input_spec={
                "height": height,
                "width": width,
                "channels": channels,
                "mean": IMAGENET_MEAN,
                "std": IMAGENET_STD,
            },
            untrained=True,
        )
    return store


def prepare(
    model: str, store: Path | None, out: Path, n_images: int, photo_size: tuple[int, int] | None = None
) -> Workload:
    """Images on disk and the store holding the model; nothing is ever written to model_store/."""
    if model == "fashion":
        if store is None:
            store = BUNDLED_STORE if versions(BUNDLED_STORE / "igcv2-fashion") else untrained_fashion(out / "store")
        return Workload("igcv2-fashion", store, write_images(fashion_pngs(n_images), out / "images"), "image/png")
    if model == "imagenet":
        store = untrained_imagenet(store or out / "store")
        return Workload(
            "igcv2-imagenet-untrained",
            store,
            write_images(photo_jpegs(n_images, photo_size), out / "images"),
            "image/jpeg",
        )
    raise ValueError(f"unknown model workload {model!r} (fashion or imagenet)")


def latest_version_dir(store: Path, model: str) -> Path:
    found = versions(store / model)
    if not found:
        raise FileNotFoundError(f"no version of {model} in {store}")
    return store / model / str(found[-1])


def model_info(version_dir: Path) -> dict[str, object]:
    config = json.loads((version_dir / CONFIG_FILE).read_text())
    keys = ("name", "version", "architecture", "input", "params", "macs", "metrics", "untrained", "serving")
    return {"path": str(version_dir), **{k: config.get(k) for k in keys}}


def multipart(parts: list[tuple[str, bytes, str]]) -> bytes:
    """A multipart/form-data body with one ``file`` part per (filename, data, content type)."""
    out = io.BytesIO()
    for filename, data, content_type in parts:
        out.write(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n".encode()
        )
        out.write(data)
        out.write(b"\r\n")
    out.write(f"--{BOUNDARY}--\r\n".encode())
    return out.getvalue()


MULTIPART_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def valid_bodies(work: Workload, folder: Path, images_per_request: int, query: str = "") -> list[Body]:
    """One body per image (raw ``image/*``), or multipart bodies of ``images_per_request`` images."""
    folder.mkdir(parents=True, exist_ok=True)
    query = "&".join(q for q in (f"model={work.model}", query) if q)
    if images_per_request == 1:
        return [Body(p.stem, p, work.content_type, 1, query) for p in work.images]
    bodies = []
    for i in range(len(work.images)):
        chosen = [work.images[(i + j) % len(work.images)] for j in range(images_per_request)]
        path = folder / f"multipart-{images_per_request}-{i}.bin"
        path.write_bytes(multipart([(p.name, p.read_bytes(), work.content_type) for p in chosen]))
        bodies.append(Body(path.stem, path, MULTIPART_TYPE, images_per_request, query))
    return bodies


@dataclass(frozen=True)
class SoakClass:
    """One kind of soak traffic and the status codes it should get."""

    body: Body
    expected: tuple[int, ...]


def soak_classes(work: Workload, folder: Path, max_images_per_request: int) -> list[SoakClass]:
    """Valid traffic plus the documented bad inputs, each with the answer DESIGN.md section 4 gives."""
    folder.mkdir(parents=True, exist_ok=True)
    model = f"model={work.model}"
    first = work.images[0]
    data = first.read_bytes()

    def body(name: str, payload: bytes, content_type: str, images: int, query: str = model) -> Body:
        path = folder / f"soak-{name}.bin"
        path.write_bytes(payload)
        return Body(name, path, content_type, images, query)

    tiny = encode(np.zeros((1, 1), np.uint8), "PNG")
    too_many = [(f"t{i}.png", tiny, "image/png") for i in range(max_images_per_request + 1)]
    # A 1-bit 8000x8000 PNG: a few KB on the wire, 64 MP declared (over the 40 MP default limit).
    bomb = io.BytesIO()
    Image.new("1", (8000, 8000)).save(bomb, format="PNG", optimize=True)
    pair = [(p.name, p.read_bytes(), work.content_type) for p in work.images[:2]]
    return [
        SoakClass(Body("valid-raw", first, work.content_type, 1, model), (200,)),
        SoakClass(body("valid-multipart", multipart(pair), MULTIPART_TYPE, len(pair)), (200,)),
        SoakClass(body("truncated", data[: len(data) // 2], work.content_type, 1), (400,)),
        SoakClass(body("empty", b"", work.content_type, 1), (400,)),
        SoakClass(body("text", b"this is not an image\n" * 20, "text/plain", 1), (415,)),
        SoakClass(body("unknown-model", data, work.content_type, 1, "model=no-such-model"), (404,)),
        SoakClass(body("bad-top-k", data, work.content_type, 1, f"{model}&top_k=0"), (422,)),
        SoakClass(body("too-many-images", multipart(too_many), MULTIPART_TYPE, len(too_many)), (413,)),
        SoakClass(body("too-many-pixels", bomb.getvalue(), "image/png", 1), (413,)),
    ]
