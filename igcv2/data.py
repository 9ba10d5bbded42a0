"""Dataset readers that never unpickle: IDX (MNIST family), CIFAR binary, image folders.

Every reader returns an :class:`ArrayDataset` of uint8 NHWC images and int64 labels, the same
layout the service feeds its models, so training, evaluation and serving share one path.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
MNIST_DIR = Path("/usr/share/datasets/mnist")
FASHION_MNIST_LABELS = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DatasetError(ValueError):
    """A data file is missing or malformed; the message names the file."""


@dataclass(frozen=True)
class ArrayDataset:
    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int64
    classes: list[str]

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 NHWC, got {self.images.dtype} {self.images.shape}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int) -> ArrayDataset:
        """The first ``n`` examples (for smoke runs)."""
        return ArrayDataset(self.images[:n], self.labels[:n], self.classes)


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (gzipped or not)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"IDX file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DatasetError(f"cannot read IDX file {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetError(f"not an IDX file (bad magic number): {path}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"truncated IDX header in {path}")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DatasetError(f"IDX file {path} holds {len(raw) - header} data bytes, header says {expected}")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise DatasetError(f"IDX file not found: {root / stem}[.gz]")


def load_idx_dataset(root: Path, split: str, classes: list[str]) -> ArrayDataset:
    """MNIST-family IDX files: ``train-*`` / ``t10k-*`` images and labels in ``root``."""
    prefix = {"train": "train", "test": "t10k"}[_check_split(split)]
    images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetError(f"IDX images {images.shape} and labels {labels.shape} in {root} do not match")
    return ArrayDataset(images[..., None].astype(np.uint8), labels.astype(np.int64), classes)


def load_cifar_binary(root: Path, split: str, fine: bool = True) -> ArrayDataset:
    """CIFAR-10 (``data_batch_*.bin``) or CIFAR-100 (``train.bin``) binary version."""
    root = Path(root)
    split = _check_split(split)
    if (root / "batches.meta.txt").exists() or (root / "test_batch.bin").exists():
        files = [root / f"data_batch_{i}.bin" for i in range(1, 6)] if split == "train" else [root / "test_batch.bin"]
        label_bytes, label_index, names_file = 1, 0, root / "batches.meta.txt"
    else:
        files = [root / f"{split}.bin"]
        label_bytes, label_index = 2, 1 if fine else 0
        names_file = root / ("fine_label_names.txt" if fine else "coarse_label_names.txt")
    record = label_bytes + 3 * 32 * 32
    chunks = []
    for f in files:
        if not f.is_file():
            raise DatasetError(f"CIFAR binary file not found: {f}")
        raw = np.fromfile(f, np.uint8)
        if raw.size == 0 or raw.size % record:
            raise DatasetError(f"{f} is {raw.size} bytes, not a whole number of {record}-byte records")
        chunks.append(raw.reshape(-1, record))
    data = np.concatenate(chunks)
    labels = data[:, label_index].astype(np.int64)
    images = data[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
    if names_file.is_file():
        classes = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
    else:
        classes = [str(i) for i in range(int(labels.max()) + 1)]
    return ArrayDataset(images, labels, classes)


def to_mode(image: Image.Image, channels: int) -> Image.Image:
    """Convert any Pillow mode to ``L`` (1 channel) or ``RGB`` (3 channels).

    Transparency is flattened onto black (transparent = no signal, as in Fashion-MNIST's
    black background); 16-bit and float images are scaled to 8 bits, not clipped.
    """
    target = "L" if channels == 1 else "RGB"
    if image.mode == target:
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array * (255.0 / peak), 0, 255).round().astype(np.uint8), "L")
    elif image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(flat, rgba)
    return image.convert(target)


def fit_image(image: Image.Image, height: int, width: int, channels: int) -> np.ndarray:
    """Turn a decoded image into model input: EXIF-upright, ``L``/``RGB``, shorter side resized
    to fit, centre-cropped to (height, width); uint8 (H, W, C). Training folders and the
    service share this function, so both see identical pixels."""
    image = to_mode(ImageOps.exif_transpose(image), channels)
    w, h = image.size
    if (w, h) != (width, height):
        scale = max(width / w, height / h)
        size = (max(width, round(w * scale)), max(height, round(h * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR)
        left, top = (size[0] - width) // 2, (size[1] - height) // 2
        image = image.crop((left, top, left + width, top + height))
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def folder_classes(root: Path) -> list[str]:
    """The class subfolders of one split, sorted (their order is the class ids)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image folder not found: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise DatasetError(f"image folder {root} has no class subfolders")
    return classes


def load_image_folder(
    root: Path, height: int, width: int, channels: int, classes: list[str] | None = None
) -> ArrayDataset:
    """One subfolder per class, images of any size fitted to the input.

    Class ids are positions in ``classes`` (default: this folder's sorted subfolders). A test
    split passes the training split's list, since numbering its own subfolders would give a
    class another id whenever the test split lacks one.
    """
    root = Path(root)
    present = folder_classes(root)
    classes = present if classes is None else classes
    unknown = [name for name in present if name not in classes]
    if unknown:
        raise DatasetError(f"image folder {root} has classes {unknown} that are not among the known classes {classes}")
    images, labels = [], []
    for name in present:
        class_id = classes.index(name)
        for f in sorted((root / name).iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(f) as img:
                    images.append(fit_image(img, height, width, channels))
            except (OSError, ValueError) as exc:
                raise DatasetError(f"cannot decode image {f}: {exc}") from exc
            labels.append(class_id)
    if not images:
        raise DatasetError(f"image folder {root} holds no images")
    return ArrayDataset(np.stack(images), np.asarray(labels, np.int64), classes)


def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split


DATASETS = ("fashion-mnist", "mnist", "cifar10", "cifar100", "folder")


def load_dataset(
    name: str,
    split: str,
    root: Path | None = None,
    input_size: tuple[int, int, int] = (3, 32, 32),
    classes: list[str] | None = None,
) -> ArrayDataset:
    """Load a named dataset; ``root`` overrides the default directory.

    ``input_size`` (C, H, W) and ``classes`` only matter for ``folder``: its images are fitted to
    the input size, and its class ids are positions in ``classes`` (default: the ``train``
    split's subfolders), so that every split, and the model, agree on them.
    """
    if name == "fashion-mnist":
        return load_idx_dataset(Path(root or FASHION_MNIST_DIR), split, FASHION_MNIST_LABELS)
    if name == "mnist":
        return load_idx_dataset(Path(root or MNIST_DIR), split, [str(i) for i in range(10)])
    if name in ("cifar10", "cifar100"):
        if root is None:
            raise ValueError(f"--data-dir is required for {name} (no system copy exists)")
        return load_cifar_binary(Path(root), split)
    if name == "folder":
        if root is None:
            raise ValueError("--data-dir is required for an image folder dataset")
        c, h, w = input_size
        return load_image_folder(Path(root) / split, h, w, c, classes or folder_classes(Path(root) / "train"))
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
