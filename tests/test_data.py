"""Tests for client.data: loaders, path safety, image bytes and the few-shot protocol."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.data import (
    DEFAULT_FASHION_MNIST_DIR,
    DIGITS_CLASSES,
    FASHION_MNIST_CLASSES,
    UPLOAD_MAX_BYTES,
    UPLOAD_MAX_PIXELS,
    Dataset,
    DatasetUnavailable,
    Example,
    class_counts,
    few_shot_split,
    load_dataset,
)

FASHION_FILES = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
]


def _save_image(path: Path, value: int, fmt: str = "PNG", size: int = 6) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (value, 255 - value, value // 2)).save(path, format=fmt)


def _make_class_tree(directory: Path, classes: dict[str, int]) -> None:
    for name, count in classes.items():
        for i in range(count):
            _save_image(directory / name / f"img_{i:03d}.png", (i * 37) % 256)


def _synthetic_dataset(per_class_train: int = 30, per_class_test: int = 20, classes: int = 3) -> Dataset:
    def examples(split: str, per_class: int) -> list[Example]:
        return [
            Example.from_array(label, np.full((4, 4), label * 40 + i % 40, np.uint8), f"{split}/{label}/{i}")
            for label in range(classes)
            for i in range(per_class)
        ]

    return Dataset(
        name="synthetic",
        class_names=[f"class {i}" for i in range(classes)],
        train=examples("train", per_class_train),
        test=examples("test", per_class_test),
    )


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as stream:
        stream.write(header + array.astype(np.uint8).tobytes())


# Fashion-MNIST ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fashion_mnist() -> Dataset:
    if not all((DEFAULT_FASHION_MNIST_DIR / name).is_file() for name in FASHION_FILES):
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    return load_dataset("fashion-mnist")


def test_fashion_mnist_sizes_and_classes(fashion_mnist: Dataset) -> None:
    assert len(fashion_mnist.train) == 60000
    assert len(fashion_mnist.test) == 10000
    assert fashion_mnist.class_names == list(FASHION_MNIST_CLASSES)
    assert fashion_mnist.val is None
    assert set(class_counts(fashion_mnist.train)) == set(range(10))
    assert fashion_mnist.train[123].source == "fashion-mnist/train/123"


def test_fashion_mnist_images_are_dark_on_white_rgb(fashion_mnist: Dataset) -> None:
    # Single garments may fill most of the frame, so brightness is judged over a sample.
    pixels = np.stack([np.asarray(e.image()) for e in fashion_mnist.train[:50] + fashion_mnist.test[:50]])
    assert pixels.shape == (100, 28, 28, 3)
    assert pixels.mean() > 127
    assert (pixels[:, 0, 0] == 255).all()
    assert fashion_mnist.train[0].image().mode == "RGB"


def test_fashion_mnist_from_data_dir(tmp_path: Path) -> None:
    images = np.zeros((5, 28, 28), np.uint8)
    images[:, 10:18, 10:18] = 200
    labels = np.array([0, 1, 2, 3, 9], np.uint8)
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    dataset = load_dataset("fashion-mnist", data_dir=tmp_path)
    assert [e.label for e in dataset.train] == [0, 1, 2, 3, 9]
    pixels = np.asarray(dataset.test[0].image())
    assert pixels[0, 0].tolist() == [255, 255, 255]
    assert pixels[14, 14].tolist() == [55, 55, 55]


def test_fashion_mnist_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailable, match="dataset-fashion-mnist"):
        load_dataset("fashion-mnist", data_dir=tmp_path)
    assert issubclass(DatasetUnavailable, FileNotFoundError)


# digits ----------------------------------------------------------------------------------------


def test_digits_loads_split_and_dark_on_white() -> None:
    dataset = load_dataset("digits", seed=0)
    assert dataset.class_names == list(DIGITS_CLASSES)
    assert len(dataset.train) + len(dataset.test) == 1797
    assert abs(len(dataset.train) - len(dataset.test)) <= 10
    assert {e.source for e in dataset.train}.isdisjoint({e.source for e in dataset.test})
    train_counts, test_counts = class_counts(dataset.train), class_counts(dataset.test)
    assert all(abs(train_counts[c] - test_counts[c]) <= 1 for c in range(10))
    image = dataset.train[0].image()
    assert image.mode == "RGB" and image.size == (8, 8)
    assert np.mean([np.asarray(e.image()).mean() for e in dataset.train[:50]]) > 127


def test_digits_split_is_seeded() -> None:
    sources = lambda d: [e.source for e in d.train]  # noqa: E731
    assert sources(load_dataset("digits", seed=0)) == sources(load_dataset("digits", seed=0))
    assert sources(load_dataset("digits", seed=0)) != sources(load_dataset("digits", seed=1))


# image folders ---------------------------------------------------------------------------------


def test_imagefolder_with_train_and_test(tmp_path: Path) -> None:
    _make_class_tree(tmp_path / "train", {"golden_retriever": 4, "tabby_cat": 3})
    _make_class_tree(tmp_path / "test", {"golden_retriever": 2, "tabby_cat": 2})
    (tmp_path / "train" / "tabby_cat" / "notes.txt").write_text("not an image")
    dataset = load_dataset(f"imagefolder:{tmp_path}")
    assert dataset.class_names == ["golden retriever", "tabby cat"]
    assert class_counts(dataset.train) == {0: 4, 1: 3}
    assert class_counts(dataset.test) == {0: 2, 1: 2}
    assert dataset.val is None
    assert dataset.train[0].source == "train/golden_retriever/img_000.png"


def test_imagefolder_with_val_split(tmp_path: Path) -> None:
    for split in ("train", "val", "test"):
        _make_class_tree(tmp_path / split, {"a": 3, "b": 3})
    dataset = load_dataset(f"imagefolder:{tmp_path}")
    assert dataset.val is not None and class_counts(dataset.val) == {0: 3, 1: 3}


def test_imagefolder_unknown_test_class_rejected(tmp_path: Path) -> None:
    _make_class_tree(tmp_path / "train", {"a": 2})
    _make_class_tree(tmp_path / "test", {"a": 2, "b": 2})
    with pytest.raises(ValueError, match="missing from train"):
        load_dataset(f"imagefolder:{tmp_path}")


def test_imagefolder_flat_tree_is_split_with_seed(tmp_path: Path) -> None:
    _make_class_tree(tmp_path, {"red_fox": 10, "gray_wolf": 10})
    dataset = load_dataset(f"imagefolder:{tmp_path}", seed=3)
    assert dataset.class_names == ["gray wolf", "red fox"]
    assert class_counts(dataset.train) == {0: 7, 1: 7}
    assert class_counts(dataset.test) == {0: 3, 1: 3}
    assert {e.source for e in dataset.train}.isdisjoint({e.source for e in dataset.test})
    again = load_dataset(f"imagefolder:{tmp_path}", seed=3)
    assert [e.source for e in again.test] == [e.source for e in dataset.test]


def test_imagefolder_symlinked_class_outside_rejected(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    _make_class_tree(root, {"inside": 3})
    _make_class_tree(outside, {"secret": 3})
    (root / "secret").symlink_to(outside / "secret", target_is_directory=True)
    with pytest.raises(ValueError, match="outside the data root"):
        load_dataset(f"imagefolder:{root}")


def test_imagefolder_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailable):
        load_dataset(f"imagefolder:{tmp_path / 'nope'}")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match="without images"):
        load_dataset(f"imagefolder:{tmp_path}")


# CoOp ------------------------------------------------------------------------------------------


def _make_coop(tmp_path: Path, extra_train: list[list[object]] | None = None) -> tuple[Path, Path]:
    root = tmp_path / "images"
    entries: dict[str, list[list[object]]] = {"train": [], "val": [], "test": []}
    for split, count in (("train", 6), ("val", 2), ("test", 3)):
        for label, name in enumerate(["sea_turtle", "airliner"]):
            for i in range(count):
                rel = f"{name}/{split}_{i}.jpg"
                _save_image(root / rel, i * 20 + label, fmt="JPEG")
                entries[split].append([rel, label, name])
    entries["train"].extend(extra_train or [])
    split_json = tmp_path / "split_zhou_Toy.json"
    split_json.write_text(json.dumps(entries))
    return split_json, root


def test_coop_format(tmp_path: Path) -> None:
    split_json, root = _make_coop(tmp_path)
    dataset = load_dataset(f"coop:{split_json}:{root}")
    assert dataset.name == "split_zhou_Toy"
    assert dataset.class_names == ["sea turtle", "airliner"]
    assert class_counts(dataset.train) == {0: 6, 1: 6}
    assert dataset.val is not None and class_counts(dataset.val) == {0: 2, 1: 2}
    assert class_counts(dataset.test) == {0: 3, 1: 3}
    assert dataset.train[0].source == "sea_turtle/train_0.jpg"


@pytest.mark.parametrize("bad_path", ["../outside.jpg", "sea_turtle/../../outside.jpg", "/etc/passwd"])
def test_coop_path_traversal_rejected(tmp_path: Path, bad_path: str) -> None:
    _save_image(tmp_path / "outside.jpg", 1, fmt="JPEG")
    split_json, root = _make_coop(tmp_path, extra_train=[[bad_path, 0, "sea_turtle"]])
    with pytest.raises(ValueError, match=r"train\[12\]"):
        load_dataset(f"coop:{split_json}:{root}")


def test_coop_missing_image_and_bad_spec(tmp_path: Path) -> None:
    split_json, root = _make_coop(tmp_path, extra_train=[["sea_turtle/gone.jpg", 0, "sea_turtle"]])
    with pytest.raises(DatasetUnavailable, match=r"gone\.jpg"):
        load_dataset(f"coop:{split_json}:{root}")
    with pytest.raises(ValueError, match="coop:SPLIT_JSON:IMAGE_ROOT"):
        load_dataset(f"coop:{split_json}")


def test_unknown_spec_lists_valid_forms() -> None:
    with pytest.raises(ValueError, match=r"imagefolder:PATH"):
        load_dataset("cifar10")


# image bytes -----------------------------------------------------------------------------------


def test_camera_sized_photos_are_uploaded_downscaled(tmp_path: Path) -> None:
    # 24 MP (6000 x 4000) is over cbbt's 16.7 MP per image, and 100x what the encoder uses.
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(coarse).resize((6000, 4000)).save(tmp_path / "camera.jpg", quality=90)
    photo = Example.from_file(0, tmp_path / "camera.jpg", "camera.jpg")
    sent = photo.image_bytes()
    assert sent == photo.image_bytes()  # deterministic: the feature cache is keyed by it
    with Image.open(io.BytesIO(sent)) as img:
        assert img.format == "JPEG" and img.size == (1254, 836)  # ~1 MP, the aspect kept
    assert photo.image().size == (1254, 836)  # what views are cut from, too
    # A file under the pixel bound but over the byte bound is re-encoded, not resized.
    noisy = rng.integers(0, 255, (1800, 1800, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(tmp_path / "noisy.png")
    assert (tmp_path / "noisy.png").stat().st_size > UPLOAD_MAX_BYTES and UPLOAD_MAX_PIXELS >= 1800 * 1800
    with Image.open(
        io.BytesIO(Example.from_file(0, tmp_path / "noisy.png", "noisy.png").image_bytes())
    ) as img:
        assert img.format == "JPEG" and img.size == (1800, 1800)


def test_a_photo_stored_rotated_is_uploaded_upright(tmp_path: Path) -> None:
    # Phones store the sensor's pixels and an EXIF orientation (6: turn 90° clockwise to view).
    pixels = np.zeros((40, 60, 3), np.uint8)
    pixels[:, :30] = 255  # left half white as stored: the top half once upright
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    photo = Example.from_file(0, tmp_path / "phone.jpg", "phone.jpg")
    sent = photo.image_bytes()
    assert sent != (tmp_path / "phone.jpg").read_bytes() and sent == photo.image_bytes()
    with Image.open(io.BytesIO(sent)) as img:
        upright = np.asarray(img.convert("L"), dtype=float)
    assert upright.shape == (60, 40)  # turned: 40 wide, 60 tall
    assert upright[:25].mean() > 200 and upright[35:].mean() < 50  # white on top, as viewers show it
    assert photo.image().size == (40, 60)


def test_image_bytes_deterministic_and_passthrough(tmp_path: Path) -> None:
    _save_image(tmp_path / "a.jpg", 10, fmt="JPEG")
    _save_image(tmp_path / "b.bmp", 10, fmt="BMP")
    jpeg = Example.from_file(0, tmp_path / "a.jpg", "a.jpg")
    bmp = Example.from_file(0, tmp_path / "b.bmp", "b.bmp")
    assert jpeg.image_bytes() == (tmp_path / "a.jpg").read_bytes()
    assert bmp.image_bytes() == bmp.image_bytes()
    assert bmp.image_bytes().startswith(b"\x89PNG")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(bmp.image_bytes()))), np.asarray(bmp.image()))

    first = load_dataset("digits").train[:5]
    second = load_dataset("digits").train[:5]
    digests = [hashlib.sha256(e.image_bytes()).hexdigest() for e in first]
    assert digests == [hashlib.sha256(e.image_bytes()).hexdigest() for e in second]
    assert len(set(digests)) == 5
    assert Image.open(io.BytesIO(first[0].image_bytes())).mode == "RGB"


# few-shot protocol -----------------------------------------------------------------------------


def test_few_shot_counts_and_disjointness() -> None:
    dataset = _synthetic_dataset()
    for shots in (1, 2, 4, 8, 16):
        split = few_shot_split(dataset, shots, seed=1)
        assert class_counts(split.train) == {0: shots, 1: shots, 2: shots}
        n_val = min(shots, 4)
        assert class_counts(split.val) == {0: n_val, 1: n_val, 2: n_val}
        train_sources = {e.source for e in split.train}
        val_sources = {e.source for e in split.val}
        test_sources = {e.source for e in dataset.test}
        assert train_sources.isdisjoint(val_sources)
        assert (train_sources | val_sources).isdisjoint(test_sources)
        assert (train_sources | val_sources) <= {e.source for e in dataset.train}
        assert split.test == dataset.test
        assert (split.shots, split.seed) == (shots, 1)


def test_few_shot_val_override_and_given_val() -> None:
    dataset = _synthetic_dataset()
    assert class_counts(few_shot_split(dataset, 2, 0, val_per_class=5).val) == {0: 5, 1: 5, 2: 5}
    dataset.val = [
        Example.from_array(label, np.zeros((4, 4), np.uint8), f"val/{label}/{i}")
        for label in range(3)
        for i in range(6)
    ]
    split = few_shot_split(dataset, 8, seed=2)
    assert {e.source.split("/")[0] for e in split.val} == {"val"}
    assert class_counts(split.val) == {0: 4, 1: 4, 2: 4}


def test_few_shot_deterministic_and_seed_dependent() -> None:
    dataset = _synthetic_dataset()
    a, b = few_shot_split(dataset, 4, seed=1), few_shot_split(dataset, 4, seed=1)
    c = few_shot_split(dataset, 4, seed=2)
    assert [e.source for e in a.train] == [e.source for e in b.train]
    assert [e.source for e in a.val] == [e.source for e in b.val]
    assert [e.source for e in a.train] != [e.source for e in c.train]
    assert [e.label for e in a.train] == sorted(e.label for e in a.train)


def test_few_shot_test_subset_identical_across_seeds() -> None:
    dataset = _synthetic_dataset()
    subsets = [few_shot_split(dataset, 2, seed, max_test_per_class=5).test for seed in (1, 2, 3)]
    assert class_counts(subsets[0]) == {0: 5, 1: 5, 2: 5}
    assert all([e.source for e in s] == [e.source for e in subsets[0]] for s in subsets)


def test_few_shot_too_few_images() -> None:
    dataset = _synthetic_dataset(per_class_train=5)
    with pytest.raises(ValueError, match=r"class 0 .*too few"):
        few_shot_split(dataset, 4, seed=0)
    with pytest.raises(ValueError, match="shots"):
        few_shot_split(dataset, 0, seed=0)
    with pytest.raises(ValueError, match="has 1 class; a classifier needs at least 2"):
        few_shot_split(_synthetic_dataset(classes=1), 1, seed=0)


def test_a_user_run_trains_small_classes_on_what_they_have(caplog: pytest.LogCaptureFixture) -> None:
    dataset = _synthetic_dataset(per_class_train=5)
    split = few_shot_split(dataset, 8, seed=0, allow_fewer=True)
    # 5 images: one (5 // 5) for validation, 4 to train; every class is short here.
    assert class_counts(split.train) == {0: 4, 1: 4, 2: 4} and class_counts(split.val) == {0: 1, 1: 1, 2: 1}
    assert split.short_classes == {name: 4 for name in dataset.class_names}
    assert "3 of 3 classes have fewer than 8 shots + 4 validation images" in caplog.text
    assert not {e.source for e in split.train} & {e.source for e in split.val}
    # Classes with enough images are drawn exactly as the strict split draws them.
    assert few_shot_split(dataset, 1, seed=0, allow_fewer=True).short_classes == {}
    strict = few_shot_split(dataset, 1, seed=0)
    assert [e.source for e in few_shot_split(dataset, 1, seed=0, allow_fewer=True).train] == [
        e.source for e in strict.train
    ]
    # One image: it trains, nothing validates; no image at all is still an error.
    one = few_shot_split(_synthetic_dataset(per_class_train=1), 4, seed=0, allow_fewer=True)
    assert class_counts(one.train) == {0: 1, 1: 1, 2: 1} and one.val == []
    pixels = np.zeros((4, 4), np.uint8)
    no_images = Dataset(
        name="gap",
        class_names=["a", "b"],
        train=[Example.from_array(0, pixels, "train/0")],
        test=[Example.from_array(k, pixels, f"test/{k}") for k in (0, 1)],
    )
    with pytest.raises(ValueError, match=r"class 1 \('b'\) has 0 images"):
        few_shot_split(no_images, 4, seed=0, allow_fewer=True)


def test_few_shot_rejects_leaked_test_image() -> None:
    dataset = _synthetic_dataset(per_class_train=2, per_class_test=2, classes=2)
    dataset.test.append(dataset.train[0])
    with pytest.raises(ValueError, match="also test images"):
        few_shot_split(dataset, 1, seed=0, val_per_class=1)


def test_few_shot_on_fashion_mnist(fashion_mnist: Dataset) -> None:
    split = few_shot_split(fashion_mnist, 16, seed=1, max_test_per_class=100)
    assert len(split.train) == 160 and len(split.val) == 40 and len(split.test) == 1000
    assert all(e.source.startswith("fashion-mnist/train/") for e in split.train + split.val)
