"""Dataset readers: IDX (gzipped and plain), the real Fashion-MNIST, CIFAR binary, image folders, fit_image."""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from igcv2.data import (
    FASHION_MNIST_DIR,
    FASHION_MNIST_LABELS,
    ArrayDataset,
    DatasetError,
    fit_image,
    load_cifar_binary,
    load_dataset,
    load_idx_dataset,
    read_idx,
)

IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C}
IDX_CODES |= {np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode an array in the IDX format: 0, 0, type code, ndim, big-endian dims, big-endian data."""
    header = bytes([0, 0, IDX_CODES[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    data = idx_bytes(array)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)
    return path


# --- IDX ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_read_idx_round_trips_uint8(tmp_path: Path, name: str) -> None:
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = write_idx(tmp_path / name, array)
    if name.endswith(".gz"):
        assert path.read_bytes()[:2] == b"\x1f\x8b"  # really gzipped
    got = read_idx(path)
    assert got.shape == (5, 7, 3)
    np.testing.assert_array_equal(got, array)


@pytest.mark.parametrize("dtype", [">i2", ">i4", ">f4", ">f8", "int8"])
def test_read_idx_decodes_big_endian_types(tmp_path: Path, dtype: str) -> None:
    array = np.array([[-3, 2, 1000], [7, -100, 0]]).astype(dtype)
    got = read_idx(write_idx(tmp_path / "x.idx", array))
    np.testing.assert_array_equal(got, array)
    assert got.dtype == np.dtype(dtype)


def test_read_idx_missing_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "nope-idx1-ubyte"
    with pytest.raises(DatasetError, match="not found") as info:
        read_idx(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_bad_magic_names_the_file(tmp_path: Path, gz: bool) -> None:
    data = bytearray(idx_bytes(np.zeros((2, 2), np.uint8)))
    data[0] = 0x12
    path = tmp_path / ("bad.gz" if gz else "bad")
    if gz:
        path.write_bytes(gzip.compress(bytes(data)))
    else:
        path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="bad magic") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_unknown_type_code_is_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "weird"
    path.write_bytes(bytes([0, 0, 0x07, 1, 0, 0, 0, 1, 5]))
    with pytest.raises(DatasetError, match="bad magic") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_truncated_data_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "short-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((4, 5, 5), np.uint8))[:-7])
    with pytest.raises(DatasetError, match="93 data bytes, header says 100") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_truncated_header_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "header-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((4, 5, 5), np.uint8))[:9])
    with pytest.raises(DatasetError, match="truncated IDX header") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_too_short_for_magic(tmp_path: Path) -> None:
    path = tmp_path / "tiny"
    path.write_bytes(b"\x00\x00")
    with pytest.raises(DatasetError) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_broken_gzip_names_the_file(tmp_path: Path) -> None:
    not_gzip = tmp_path / "plain-but-named.gz"
    not_gzip.write_bytes(idx_bytes(np.zeros((2, 2), np.uint8)))
    cut = tmp_path / "cut.gz"
    cut.write_bytes(gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8)))[:30])
    for path in (not_gzip, cut):
        with pytest.raises(DatasetError, match="cannot read IDX file") as info:
            read_idx(path)
        assert str(path) in str(info.value)


def make_mnist_dir(root: Path, n_train: int = 6, n_test: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    train_x = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    train_y = (np.arange(n_train) % 10).astype(np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    write_idx(root / "train-images-idx3-ubyte.gz", train_x)  # gzipped ...
    write_idx(root / "train-labels-idx1-ubyte", train_y)  # ... and plain, side by side
    write_idx(root / "t10k-images-idx3-ubyte", rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8))
    write_idx(root / "t10k-labels-idx1-ubyte.gz", (np.arange(n_test) % 10).astype(np.uint8))
    return train_x, train_y


def test_idx_dataset_from_a_directory(tmp_path: Path) -> None:
    train_x, train_y = make_mnist_dir(tmp_path)
    train = load_idx_dataset(tmp_path, "train", FASHION_MNIST_LABELS)
    assert train.images.shape == (6, 28, 28, 1)
    assert train.images.dtype == np.uint8
    assert train.labels.dtype == np.int64
    np.testing.assert_array_equal(train.images[..., 0], train_x)
    np.testing.assert_array_equal(train.labels, train_y)
    test = load_dataset("mnist", "test", tmp_path)
    assert len(test) == 4
    assert test.classes == [str(i) for i in range(10)]
    fashion = load_dataset("fashion-mnist", "train", tmp_path)
    assert fashion.classes == FASHION_MNIST_LABELS


def test_idx_dataset_missing_file_names_it(tmp_path: Path) -> None:
    make_mnist_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte") as info:
        load_idx_dataset(tmp_path, "test", FASHION_MNIST_LABELS)
    assert str(tmp_path) in str(info.value)


def test_idx_dataset_with_mismatched_counts(tmp_path: Path) -> None:
    make_mnist_dir(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(5, np.uint8))
    with pytest.raises(DatasetError, match="do not match"):
        load_idx_dataset(tmp_path, "train", FASHION_MNIST_LABELS)


def test_real_fashion_mnist_loads() -> None:
    assert FASHION_MNIST_DIR.is_dir(), (
        f"{FASHION_MNIST_DIR} is missing: install the Debian package dataset-fashion-mnist (make test does)"
    )
    train = load_dataset("fashion-mnist", "train")
    test = load_dataset("fashion-mnist", "test")
    assert train.images.shape == (60000, 28, 28, 1)
    assert test.images.shape == (10000, 28, 28, 1)
    assert train.images.dtype == test.images.dtype == np.uint8
    assert train.classes == test.classes == FASHION_MNIST_LABELS
    assert len(train.classes) == 10
    # Fashion-MNIST is balanced: 6000 / 1000 examples of each class.
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10
    assert train.images.max() == 255
    assert 0.25 < train.images.mean() / 255 < 0.32  # the known mean pixel value, about 0.286


# --- CIFAR binary ---------------------------------------------------------------------------------


def cifar_records(labels: list[list[int]], rng: np.random.Generator) -> tuple[bytes, np.ndarray]:
    """Records of label byte(s) + 1024 R + 1024 G + 1024 B; returns the bytes and the planes."""
    planes = rng.integers(0, 256, (len(labels), 3, 32, 32), dtype=np.uint8)
    rows = [bytes(lab) + planes[i].tobytes() for i, lab in enumerate(labels)]
    return b"".join(rows), planes


def make_cifar10(root: Path, per_file: int = 3) -> tuple[np.ndarray, list[int], np.ndarray, list[int]]:
    rng = np.random.default_rng(2)
    root.mkdir(parents=True, exist_ok=True)
    train_planes, train_labels = [], []
    for i in range(1, 6):
        labels = [(i * 3 + j) % 10 for j in range(per_file)]
        data, planes = cifar_records([[lab] for lab in labels], rng)
        if i == 1:  # one known pixel: record 0, row 3, column 5
            planes[0, :, 3, 5] = (11, 22, 33)
            data = b"".join(bytes([lab]) + planes[k].tobytes() for k, lab in enumerate(labels))
        (root / f"data_batch_{i}.bin").write_bytes(data)
        train_planes.append(planes)
        train_labels += labels
    test_labels = [9, 0]
    data, test_planes = cifar_records([[lab] for lab in test_labels], rng)
    (root / "test_batch.bin").write_bytes(data)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (root / "batches.meta.txt").write_text("\n".join(names) + "\n\n")
    return np.concatenate(train_planes), train_labels, test_planes, test_labels


def test_cifar10_binary_round_trips(tmp_path: Path) -> None:
    train_planes, train_labels, test_planes, test_labels = make_cifar10(tmp_path)
    train = load_dataset("cifar10", "train", tmp_path)
    assert train.images.shape == (15, 32, 32, 3)
    assert train.labels.tolist() == train_labels
    assert train.classes[0] == "airplane" and train.classes[9] == "truck" and len(train.classes) == 10
    # Channel order: R, G, B planes become the last axis, in that order.
    assert train.images[0, 3, 5].tolist() == [11, 22, 33]
    np.testing.assert_array_equal(train.images, train_planes.transpose(0, 2, 3, 1))
    test = load_cifar_binary(tmp_path, "test")
    assert test.labels.tolist() == test_labels
    np.testing.assert_array_equal(test.images, test_planes.transpose(0, 2, 3, 1))
    assert test.images.flags.c_contiguous


def test_cifar100_binary_round_trips_fine_and_coarse(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    labels = [[3, 71], [19, 5], [0, 99]]  # (coarse, fine)
    data, planes = cifar_records(labels, rng)
    planes[1, :, 31, 0] = (200, 100, 50)
    data = b"".join(bytes(lab) + planes[k].tobytes() for k, lab in enumerate(labels))
    (tmp_path / "train.bin").write_bytes(data)
    (tmp_path / "test.bin").write_bytes(data[: 2 * 3074])
    (tmp_path / "fine_label_names.txt").write_text("\n".join(f"fine{i}" for i in range(100)))
    (tmp_path / "coarse_label_names.txt").write_text("\n".join(f"coarse{i}" for i in range(20)))

    fine = load_dataset("cifar100", "train", tmp_path)
    assert fine.labels.tolist() == [71, 5, 99]
    assert len(fine.classes) == 100 and fine.classes[71] == "fine71"
    assert fine.images[1, 31, 0].tolist() == [200, 100, 50]
    np.testing.assert_array_equal(fine.images, planes.transpose(0, 2, 3, 1))

    coarse = load_cifar_binary(tmp_path, "train", fine=False)
    assert coarse.labels.tolist() == [3, 19, 0]
    assert len(coarse.classes) == 20
    assert len(load_cifar_binary(tmp_path, "test")) == 2


@pytest.mark.parametrize("extra", [100, -1])
def test_cifar_partial_record_names_the_file(tmp_path: Path, extra: int) -> None:
    make_cifar10(tmp_path)
    path = tmp_path / "test_batch.bin"
    data = path.read_bytes()
    path.write_bytes(data + bytes(extra) if extra > 0 else data[:extra])
    with pytest.raises(DatasetError, match="not a whole number of 3073-byte records") as info:
        load_cifar_binary(tmp_path, "test")
    assert str(path) in str(info.value)


def test_cifar_empty_or_missing_file_names_it(tmp_path: Path) -> None:
    make_cifar10(tmp_path)
    (tmp_path / "data_batch_3.bin").unlink()
    with pytest.raises(DatasetError, match="not found") as info:
        load_cifar_binary(tmp_path, "train")
    assert str(tmp_path / "data_batch_3.bin") in str(info.value)
    (tmp_path / "test_batch.bin").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"test_batch\.bin"):
        load_cifar_binary(tmp_path, "test")


def test_cifar100_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"train\.bin") as info:
        load_dataset("cifar100", "train", tmp_path)
    assert str(tmp_path / "train.bin") in str(info.value)


def test_load_dataset_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--data-dir is required for cifar10"):
        load_dataset("cifar10", "train")
    with pytest.raises(ValueError, match="--data-dir is required for an image folder"):
        load_dataset("folder", "train")
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet", "train", tmp_path)
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        load_dataset("mnist", "val", tmp_path)


def test_array_dataset_validates_and_subsets() -> None:
    with pytest.raises(ValueError, match="uint8 NHWC"):
        ArrayDataset(np.zeros((2, 4, 4, 1), np.float32), np.zeros(2, np.int64), ["a"])
    with pytest.raises(ValueError, match="uint8 NHWC"):
        ArrayDataset(np.zeros((2, 4, 4), np.uint8), np.zeros(2, np.int64), ["a"])
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        ArrayDataset(np.zeros((3, 4, 4, 1), np.uint8), np.zeros(2, np.int64), ["a"])
    data = ArrayDataset(np.arange(5 * 16, dtype=np.uint8).reshape(5, 4, 4, 1), np.arange(5), ["a"])
    sub = data.subset(2)
    assert len(sub) == 2
    np.testing.assert_array_equal(sub.images, data.images[:2])


# --- image folders and fit_image ------------------------------------------------------------------


def make_image_folder(root: Path) -> None:
    """train/<class>/ with images of various sizes and modes; a stray text file."""
    alpha = root / "train" / "alpha"
    gray16 = root / "train" / "gray16"
    jpeg = root / "train" / "jpeg"
    palette = root / "train" / "palette"
    for d in (alpha, gray16, jpeg, palette):
        d.mkdir(parents=True)
    # RGBA 30x20: left half opaque red, right half fully transparent white (-> black).
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[:, :15] = (255, 0, 0, 255)
    rgba[:, 15:] = (255, 255, 255, 0)
    Image.fromarray(rgba, "RGBA").save(alpha / "a.png")
    # LA (grey + alpha), 16x16, half transparent.
    la = Image.new("LA", (16, 16), (200, 255))
    la.paste((200, 0), (0, 8, 16, 16))
    la.save(alpha / "b.png")
    # 16-bit grayscale, 8x8, mid-grey: must be scaled to 8 bits (128), not clipped (255).
    Image.fromarray(np.full((8, 8), 32896, np.uint16)).save(gray16 / "g.png")
    # JPEG 40x20 stored sideways: left half white, right half black, EXIF orientation 6 (rotate 90 CW).
    rot = np.zeros((20, 40, 3), np.uint8)
    rot[:, :20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rot).save(jpeg / "r.JPG", exif=exif, quality=95)
    # Palette 16x16: index 0 blue (top half), index 1 green (bottom half).
    p = Image.new("P", (16, 16), 0)
    p.putpalette([0, 0, 255, 0, 255, 0] + [0] * (256 * 3 - 6))
    p.paste(1, (0, 8, 16, 16))
    p.save(palette / "p.png")
    # Palette with a transparent index: index 1 (bottom half) becomes black.
    p.save(palette / "q.png", transparency=1)
    (palette / "README.txt").write_text("not an image")
    (root / "test" / "alpha").mkdir(parents=True)
    Image.new("RGB", (64, 48), (10, 20, 30)).save(root / "test" / "alpha" / "x.bmp")


def test_image_folder_fits_every_mode_and_size(tmp_path: Path) -> None:
    make_image_folder(tmp_path)
    data = load_dataset("folder", "train", tmp_path, (3, 16, 16))
    assert data.classes == ["alpha", "gray16", "jpeg", "palette"]
    assert data.images.shape == (6, 16, 16, 3)
    assert data.labels.tolist() == [0, 0, 1, 2, 3, 3]
    rgba, la, gray16, jpeg, pal, pal_t = data.images.astype(int)
    # RGBA: opaque red stays red, transparent white is flattened onto black.
    assert rgba[8, 0].tolist() == [255, 0, 0]
    assert rgba[8, -1].tolist() == [0, 0, 0]
    # LA: grey where opaque, black where transparent.
    assert la[0, 0].tolist() == [200, 200, 200]
    assert la[-1, 0].tolist() == [0, 0, 0]
    # 16-bit: scaled, not clipped.
    assert (gray16 == 128).all()
    # EXIF orientation applied: the stored left (white) half is the top after rotation.
    assert jpeg[:4].min() > 230 and jpeg[-4:].max() < 25
    assert np.abs(jpeg[:, 0] - jpeg[:, -1]).max() < 10  # uniform along rows: it was rotated, not left/right
    # Palette: colours looked up; the transparent index is black.
    assert pal[0, 0].tolist() == [0, 0, 255] and pal[-1, 0].tolist() == [0, 255, 0]
    assert pal_t[0, 0].tolist() == [0, 0, 255] and pal_t[-1, 0].tolist() == [0, 0, 0]


def test_image_folder_grayscale_and_test_split(tmp_path: Path) -> None:
    make_image_folder(tmp_path)
    gray = load_dataset("folder", "train", tmp_path, (1, 12, 10))
    assert gray.images.shape == (6, 12, 10, 1)
    assert gray.images[0, 6, 0, 0] == 76  # red -> luma 0.299 * 255
    test = load_dataset("folder", "test", tmp_path, (3, 8, 8))
    assert test.classes == ["alpha", "gray16", "jpeg", "palette"] and test.images.shape == (1, 8, 8, 3)
    assert test.images[0, 4, 4].tolist() == [10, 20, 30]


def test_image_folder_test_split_numbers_classes_as_the_train_split(tmp_path: Path) -> None:
    """test/ lacks "dog": its "fox" must still be class 2, the id training gave it, not 1 ("dog")."""
    for split, names in (("train", ["cat", "dog", "fox"]), ("test", ["cat", "fox"])):
        for name in names:
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("L", (4, 4)).save(tmp_path / split / name / "x.png")
    test = load_dataset("folder", "test", tmp_path, (1, 4, 4))
    assert test.classes == ["cat", "dog", "fox"]
    assert test.labels.tolist() == [0, 2]
    # A caller that knows the class list (evaluate: the model's labels) needs no train split.
    named = load_dataset("folder", "test", tmp_path, (1, 4, 4), classes=["fox", "cat", "bird"])
    assert named.classes == ["fox", "cat", "bird"] and named.labels.tolist() == [1, 0]

    (tmp_path / "test" / "wolf").mkdir()
    with pytest.raises(DatasetError, match=r"has classes \['wolf'\] that are not among the known classes") as info:
        load_dataset("folder", "test", tmp_path, (1, 4, 4))
    assert str(tmp_path / "test") in str(info.value)
    (tmp_path / "test" / "wolf").rmdir()
    shutil.rmtree(tmp_path / "train")
    with pytest.raises(DatasetError, match="image folder not found") as info:
        load_dataset("folder", "test", tmp_path, (1, 4, 4))
    assert str(tmp_path / "train") in str(info.value)


def test_image_folder_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="image folder not found") as info:
        load_dataset("folder", "train", tmp_path, (3, 8, 8))
    assert str(tmp_path / "train") in str(info.value)
    (tmp_path / "train").mkdir()
    with pytest.raises(DatasetError, match="no class subfolders"):
        load_dataset("folder", "train", tmp_path, (3, 8, 8))
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(DatasetError, match="holds no images"):
        load_dataset("folder", "train", tmp_path, (3, 8, 8))
    broken = tmp_path / "train" / "empty" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    with pytest.raises(DatasetError, match="cannot decode image") as info:
        load_dataset("folder", "train", tmp_path, (3, 8, 8))
    assert str(broken) in str(info.value)


def test_fit_image_resizes_the_shorter_side_and_crops_the_centre() -> None:
    """160x40 image of four vertical bands (0, 80, 160, 240) under an 8-row white top band.

    Fitting to 10x10 scales by 1/4 (to 40x10) and keeps the middle 10 columns: the right end of
    band 1 and the left end of band 2 (80 | 160), with the white band in the top two rows. A
    squash would show all four bands; a crop without resizing would lose the white band.
    """
    array = np.repeat(np.array([0, 80, 160, 240], np.uint8), 40)[None, :].repeat(40, 0)
    array[:8] = 255
    out = fit_image(Image.fromarray(array, "L"), 10, 10, 1)[..., 0].astype(int)
    assert out.shape == (10, 10)
    assert out[0].min() > 230
    body = out[4:]
    assert np.abs(body[:, :3] - 80).max() <= 3
    assert np.abs(body[:, -3:] - 160).max() <= 3
    assert body.min() > 40 and body.max() < 200  # neither the outer band 0 nor band 240 survives


def test_fit_image_tall_image_keeps_the_middle_rows() -> None:
    array = np.zeros((90, 30, 3), np.uint8)
    array[:30] = (255, 0, 0)
    array[30:60] = (0, 255, 0)
    array[60:] = (0, 0, 255)
    out = fit_image(Image.fromarray(array), 6, 6, 3)
    assert out.shape == (6, 6, 3)
    # scale 1/5 -> 6x18, rows 6..12 kept: only the green middle third remains (the filter blurs
    # the edge rows a little with the red and blue thirds, the top one red, the bottom one blue).
    inner = out[1:5].astype(int)
    assert (inner[..., 1] == 255).all() and (inner[..., 0] == 0).all() and (inner[..., 2] == 0).all()
    assert (out[[0, 5], :, 1] > 200).all()
    assert (out[0, :, 0] > 0).all() and (out[0, :, 2] == 0).all()
    assert (out[5, :, 2] > 0).all() and (out[5, :, 0] == 0).all()


def test_fit_image_exact_size_is_unchanged_and_small_images_grow() -> None:
    rng = np.random.default_rng(4)
    array = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
    np.testing.assert_array_equal(fit_image(Image.fromarray(array), 12, 20, 3), array)
    small = Image.new("RGB", (4, 3), (90, 60, 30))
    out = fit_image(small, 16, 20, 3)
    assert out.shape == (16, 20, 3)
    assert (out == np.array([90, 60, 30], np.uint8)).all()
    gray = fit_image(Image.new("L", (50, 100), 77), 12, 20, 3)
    assert gray.shape == (12, 20, 3) and (gray == 77).all()
