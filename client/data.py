"""Data sets and the few-shot protocol: local code only, nothing here talks to the server.

Four sources share one shape (`Dataset`): Fashion-MNIST from Debian's idx files, scikit-learn's
digits, class-per-folder trees and CoOp split files. `few_shot_split` then applies the protocol
of method.md §4: K shots per class, a disjoint validation set for model selection, and a test
set that never feeds training or selection.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import math
import os
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import ExifTags, Image, ImageOps

__all__ = [
    "DEFAULT_FASHION_MNIST_DIR",
    "DIGITS_CLASSES",
    "FASHION_MNIST_CLASSES",
    "IMAGE_EXTENSIONS",
    "Dataset",
    "DatasetUnavailable",
    "Example",
    "FewShotSplit",
    "class_counts",
    "few_shot_split",
    "load_dataset",
]

logger = logging.getLogger(__name__)

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# Spelled-out words: a text encoder has seen "seven" far more often than a lone "7".
DIGITS_CLASSES: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)

_SPEC_FORMS = "'fashion-mnist', 'digits', 'imagefolder:PATH', 'coop:SPLIT_JSON:IMAGE_ROOT'"
_DIGITS_TRAIN_FRACTION = 0.5
_IMAGEFOLDER_TRAIN_FRACTION = 0.7
_MAX_DEFAULT_VAL_PER_CLASS = 4
# The test subset must not move with the few-shot seed, or seeds would be scored on different
# images and their spread would mix sampling noise into the reported standard deviation.
_TEST_SUBSET_SEED = 0
# Independent random streams per purpose, so that e.g. changing the validation size never
# changes which training shots a seed draws.
_STREAM_DATASET_SPLIT = 0
_STREAM_SHOTS = 1
_STREAM_VAL = 2
_STREAM_TEST_SUBSET = 3
# Pinned rather than left to Pillow's default: the feature cache is keyed by these bytes, so a
# changed default would silently invalidate every cached in-memory image.
_PNG_COMPRESS_LEVEL = 6
# Camera photos (12-50 MP, 3-20 MB) exceed what servers accept per image (cbbt: 16.7 MP and
# 8 MiB; hosted APIs less) and 100x what a 224-px encoder uses. Images beyond these bounds are
# sent downscaled to about 1 MP (shorter side still >= 4x the encoder's 224 px, so the server's
# own resize does the final anti-aliasing), as JPEG; smaller ones travel as they are.
UPLOAD_MAX_PIXELS = 2048 * 2048
UPLOAD_MAX_BYTES = 4 * 1024 * 1024
_UPLOAD_TARGET_PIXELS = 1024 * 1024
_UPLOAD_JPEG_QUALITY = 95

_IDX_UINT8 = 0x08
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8\xff"

UInt8Array = npt.NDArray[np.uint8]


class DatasetUnavailable(FileNotFoundError):
    """The data set's files are not where the spec says; installing or pointing at them fixes it."""


class _PixelBank:
    """A shared uint8 array of images (N, H, W) or (N, H, W, 3) that examples index into.

    Compares and hashes by identity, so that examples holding it stay hashable and cheap to
    compare (70k Fashion-MNIST examples share one bank).
    """

    __slots__ = ("pixels",)

    def __init__(self, pixels: UInt8Array) -> None:
        if pixels.dtype != np.uint8 or pixels.ndim not in (3, 4):
            raise ValueError(
                f"expected uint8 images of shape (N, H, W[, 3]), got {pixels.dtype} {pixels.shape}"
            )
        pixels.setflags(write=False)
        self.pixels = pixels

    def __len__(self) -> int:
        return int(self.pixels.shape[0])

    def __repr__(self) -> str:
        return f"_PixelBank(shape={self.pixels.shape})"


@dataclass(frozen=True, slots=True)
class Example:
    """One labelled image, either a file on disk or a row of a shared in-memory array."""

    label: int
    source: str
    path: Path | None = None
    _bank: _PixelBank | None = field(default=None, repr=False)
    _index: int = field(default=-1, repr=False)

    def __post_init__(self) -> None:
        if (self.path is None) == (self._bank is None):
            raise ValueError("an Example needs exactly one of a file path or an in-memory image")
        if self._bank is not None and not 0 <= self._index < len(self._bank):
            raise ValueError(f"image index {self._index} out of range for {self._bank!r}")

    @classmethod
    def from_file(cls, label: int, path: Path, source: str) -> Example:
        return cls(label=label, source=source, path=path)

    @classmethod
    def from_array(cls, label: int, pixels: UInt8Array, source: str) -> Example:
        """An in-memory example from one uint8 image, (H, W) grey or (H, W, 3) RGB."""
        return cls._from_bank(label, _PixelBank(np.array(pixels, copy=True)[np.newaxis]), 0, source)

    @classmethod
    def _from_bank(cls, label: int, bank: _PixelBank, index: int, source: str) -> Example:
        return cls(label=label, source=source, _bank=bank, _index=index)

    def image(self) -> Image.Image:
        """The image as RGB, as it is uploaded: first frame for animated files, upright (its
        EXIF orientation applied, as viewers show phone photos), and downscaled to ~1 MP when
        over UPLOAD_MAX_PIXELS."""
        if self._bank is not None:
            return Image.fromarray(self._bank.pixels[self._index]).convert("RGB")
        assert self.path is not None
        with Image.open(self.path) as img:
            return _as_uploaded(img)

    def image_bytes(self) -> bytes:
        """The bytes to upload: deterministic, since the feature cache is keyed by their hash.

        JPEG, PNG and WebP files within UPLOAD_MAX_PIXELS and UPLOAD_MAX_BYTES, stored upright,
        travel as they are (re-encoding would cost quality and time); larger or rotated ones are
        sent as `image()`, as JPEG; anything else, including in-memory images, as PNG.
        """
        if self.path is None:
            return _encode_png(self.image())
        data = self.path.read_bytes()
        pixels, orientation = _header(data)
        if pixels > UPLOAD_MAX_PIXELS or len(data) > UPLOAD_MAX_BYTES or orientation != 1:
            with Image.open(io.BytesIO(data)) as img:  # the bytes already read: no second read
                return _encode_jpeg(_as_uploaded(img))
        if _is_upload_format(data):
            return data
        return _encode_png(self.image())


def _header(data: bytes) -> tuple[int, int]:
    """(width x height, EXIF orientation) from the header alone (Pillow decodes lazily);
    (0, 1) if it cannot be read, which leaves the decision to the decode that follows."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return int(img.width * img.height), _orientation(img)
    except (OSError, ValueError, Image.DecompressionBombError):
        return 0, 1


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1: stored upright); 1 when the EXIF block is unreadable."""
    try:
        return int(img.getexif().get(ExifTags.Base.Orientation, 1))
    except (OSError, ValueError, SyntaxError, TypeError):
        return 1


def _as_uploaded(img: Image.Image) -> Image.Image:
    """An opened file as `Example.image` gives it: upright, RGB, at most ~UPLOAD_MAX_PIXELS."""
    if _orientation(img) != 1:
        return _fit_for_upload(ImageOps.exif_transpose(img))
    return _fit_for_upload(img)


def _fit_for_upload(img: Image.Image) -> Image.Image:
    """RGB, downscaled to ~_UPLOAD_TARGET_PIXELS when over UPLOAD_MAX_PIXELS (aspect kept)."""
    pixels = img.width * img.height
    if pixels <= UPLOAD_MAX_PIXELS:
        return img.convert("RGB")
    scale = (_UPLOAD_TARGET_PIXELS / pixels) ** 0.5
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    img.draft("RGB", size)  # JPEG: decode at 1/2, 1/4 or 1/8 scale (still >= size), much faster
    return img.convert("RGB").resize(size, Image.Resampling.LANCZOS)


def _is_upload_format(data: bytes) -> bool:
    """Sniffs the content rather than trusting the extension: a mislabelled BMP gets re-encoded."""
    is_webp = data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    return data.startswith(_PNG_SIGNATURE) or data.startswith(_JPEG_SIGNATURE) or is_webp


def _encode_jpeg(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=_UPLOAD_JPEG_QUALITY)
    return buffer.getvalue()


def _encode_png(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


@dataclass
class Dataset:
    """A labelled data set with its given splits; `val` is a provided validation split, if any."""

    name: str
    class_names: list[str]
    train: list[Example]
    test: list[Example]
    val: list[Example] | None = None


@dataclass
class FewShotSplit:
    """The examples one few-shot run sees: K shots, a disjoint validation set, and the test set."""

    class_names: list[str]
    train: list[Example]
    val: list[Example]
    test: list[Example]
    shots: int
    seed: int
    # Classes with fewer labelled images than `shots` + validation (only with allow_fewer):
    # class name -> the training shots drawn for it.
    short_classes: dict[str, int] = field(default_factory=dict)


def class_counts(examples: Iterable[Example]) -> dict[int, int]:
    """Images per label, in label order."""
    counts: dict[int, int] = {}
    for example in examples:
        counts[example.label] = counts.get(example.label, 0) + 1
    return dict(sorted(counts.items()))


# --------------------------------------------------------------------------------------------
# Loading


def load_dataset(spec: str, *, data_dir: Path | None = None, seed: int = 0) -> Dataset:
    """Loads a data set from a spec.

    `data_dir` only applies to Fashion-MNIST. `seed` only drives the train/test split of sources
    that lack one (digits, a flat image folder); keep it fixed across few-shot seeds so that
    every seed is tested on the same images.
    """
    _check_seed(seed)
    kind, _, rest = spec.strip().partition(":")
    kind = kind.lower()
    started = time.perf_counter()
    if kind == "fashion-mnist" and not rest:
        dataset = _load_fashion_mnist(data_dir or DEFAULT_FASHION_MNIST_DIR)
    elif kind == "digits" and not rest:
        dataset = _load_digits(seed)
    elif kind == "imagefolder" and rest:
        dataset = _load_imagefolder(Path(rest).expanduser(), seed)
    elif kind == "coop" and rest:
        split_json, image_root = _parse_coop_spec(rest)
        dataset = _load_coop(split_json, image_root)
    else:
        raise ValueError(f"unknown data spec {spec!r}; valid forms: {_SPEC_FORMS}")
    logger.info(
        "loaded %s: %d classes, %d train / %s val / %d test images in %.2f s",
        dataset.name,
        len(dataset.class_names),
        len(dataset.train),
        "-" if dataset.val is None else len(dataset.val),
        len(dataset.test),
        time.perf_counter() - started,
    )
    return dataset


def _check_seed(seed: int) -> None:
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")


def _rng(stream: int, seed: int, label: int) -> np.random.Generator:
    """One generator per (purpose, seed, class): a class's draw is independent of the others'."""
    return np.random.default_rng([stream, seed, label])


# Fashion-MNIST ------------------------------------------------------------------------------


def _load_fashion_mnist(directory: Path) -> Dataset:
    train_images = _read_idx(_find_idx_file(directory, "train-images-idx3-ubyte"))
    train_labels = _read_idx(_find_idx_file(directory, "train-labels-idx1-ubyte"))
    test_images = _read_idx(_find_idx_file(directory, "t10k-images-idx3-ubyte"))
    test_labels = _read_idx(_find_idx_file(directory, "t10k-labels-idx1-ubyte"))
    class_names = list(FASHION_MNIST_CLASSES)
    train = _bank_examples("fashion-mnist/train", train_images, train_labels, len(class_names))
    test = _bank_examples("fashion-mnist/test", test_images, test_labels, len(class_names))
    return Dataset(name="fashion-mnist", class_names=class_names, train=train, test=test)


def _find_idx_file(directory: Path, stem: str) -> Path:
    """Debian ships gzipped files; the uncompressed originals are accepted too."""
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    raise DatasetUnavailable(
        f"Fashion-MNIST file {stem}.gz not found in {directory}; install Debian's "
        "dataset-fashion-mnist package (apt-get install dataset-fashion-mnist) or pass the "
        "directory holding the idx files as data_dir / --data-dir"
    )


def _read_idx(path: Path) -> UInt8Array:
    """Parses an idx file: 2 zero bytes, a dtype byte, a rank byte, big-endian uint32 dims, data."""
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as stream:
            raw = stream.read()
    else:
        raw = path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an idx file (bad magic number)")
    if raw[2] != _IDX_UINT8:
        raise ValueError(f"{path}: only uint8 idx data is supported, got dtype byte {raw[2]:#04x}")
    ndim = raw[3]
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise ValueError(f"{path}: truncated idx header")
    dims = struct.unpack(f">{ndim}I", raw[4:header_size])
    data = np.frombuffer(raw, dtype=np.uint8, offset=header_size)
    if data.size != math.prod(dims):
        raise ValueError(f"{path}: header promises {math.prod(dims)} values, file holds {data.size}")
    return data.reshape(dims)


def _bank_examples(prefix: str, images: UInt8Array, labels: UInt8Array, num_classes: int) -> list[Example]:
    """Wraps dark-on-light grey images as examples; sources read `{prefix}/{index}`."""
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"{prefix}: {images.shape} images do not match {labels.shape} labels")
    if labels.size and int(labels.max()) >= num_classes:
        raise ValueError(f"{prefix}: label {int(labels.max())} out of range for {num_classes} classes")
    # Inverted because ImageNet-trained encoders know garments and digits as dark on a white page.
    bank = _PixelBank(np.subtract(255, images, dtype=np.uint8))
    return [
        Example._from_bank(label, bank, index, f"{prefix}/{index}")
        for index, label in enumerate(labels.tolist())
    ]


# scikit-learn digits ------------------------------------------------------------------------


def _load_digits(seed: int) -> Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Values run 0..16; stretched to the full byte range so the images are not nearly black.
    images = np.rint(np.asarray(digits.images, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)
    labels = np.asarray(digits.target, dtype=np.uint8)
    examples = _bank_examples("digits", images, labels, len(DIGITS_CLASSES))
    train_idx, test_idx = _stratified_split(labels.tolist(), _DIGITS_TRAIN_FRACTION, seed)
    return Dataset(
        name="digits",
        class_names=list(DIGITS_CLASSES),
        train=[examples[i] for i in train_idx],
        test=[examples[i] for i in test_idx],
    )


def _stratified_split(labels: Sequence[int], train_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded per-class split of positions; every class keeps at least one training image."""
    train: list[int] = []
    test: list[int] = []
    for label, positions in sorted(_positions_by_label(labels).items()):
        order = _rng(_STREAM_DATASET_SPLIT, seed, label).permutation(len(positions))
        n_train = min(len(positions), max(1, round(len(positions) * train_fraction)))
        train.extend(positions[i] for i in order[:n_train])
        test.extend(positions[i] for i in order[n_train:])
    return sorted(train), sorted(test)


def _positions_by_label(labels: Iterable[int]) -> dict[int, list[int]]:
    grouped: dict[int, list[int]] = {}
    for position, label in enumerate(labels):
        grouped.setdefault(label, []).append(position)
    return grouped


# Image folders -------------------------------------------------------------------------------


def _load_imagefolder(root: Path, seed: int) -> Dataset:
    if not root.is_dir():
        raise DatasetUnavailable(f"image folder {root} does not exist or is not a directory")
    resolved_root = root.resolve()
    has_train, has_test = (root / "train").is_dir(), (root / "test").is_dir()
    if has_train != has_test:
        present, missing = ("train", "test") if has_train else ("test", "train")
        raise ValueError(
            f"{root} has a {present}/ folder but no {missing}/ folder; give both (each with one "
            "folder per class) or a flat tree of class folders to split"
        )
    if has_train:
        return _load_imagefolder_splits(root, resolved_root)
    files = _scan_class_folders(root, root, resolved_root)
    _require_images_in_every_class(files, root)
    folder_names = sorted(files)
    examples = _folder_examples(files, folder_names, root)
    train_idx, test_idx = _stratified_split([e.label for e in examples], _IMAGEFOLDER_TRAIN_FRACTION, seed)
    return Dataset(
        name=resolved_root.name,
        class_names=_class_names_from_folders(folder_names),
        train=[examples[i] for i in train_idx],
        test=[examples[i] for i in test_idx],
    )


def _load_imagefolder_splits(root: Path, resolved_root: Path) -> Dataset:
    train_files = _scan_class_folders(root / "train", root, resolved_root)
    _require_images_in_every_class(train_files, root / "train")
    folder_names = sorted(train_files)
    splits: dict[str, list[Example]] = {"train": _folder_examples(train_files, folder_names, root)}
    for split in ("test", "val"):
        if split == "val" and not (root / split).is_dir():
            continue
        files = _scan_class_folders(root / split, root, resolved_root)
        unknown = sorted(set(files) - set(folder_names))
        if unknown:
            raise ValueError(f"{root / split} has class folders missing from train/: {unknown}")
        empty = [name for name in folder_names if not files.get(name)]
        if empty:
            logger.warning("%s has no images for classes %s", root / split, empty)
        splits[split] = _folder_examples(files, folder_names, root)
    return Dataset(
        name=resolved_root.name,
        class_names=_class_names_from_folders(folder_names),
        train=splits["train"],
        test=splits["test"],
        val=splits.get("val"),
    )


def _scan_class_folders(directory: Path, root: Path, resolved_root: Path) -> dict[str, list[Path]]:
    """Maps each class folder name to its image files (resolved, sorted by path under `root`)."""
    _require_inside(directory, resolved_root, f"folder {directory}")
    files: dict[str, list[Path]] = {}
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        _require_inside(entry, resolved_root, f"class folder {entry}")
        files[entry.name] = _image_files(entry, resolved_root)
    return files


def _image_files(class_dir: Path, resolved_root: Path) -> list[Path]:
    # followlinks=False: a symlinked sub-folder could loop or lead outside the tree.
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in filenames:
            path = Path(dirpath) / filename
            if filename.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            found.append(_require_inside(path, resolved_root, f"image file {path}"))
    return sorted(found)


def _require_inside(path: Path, resolved_root: Path, what: str) -> Path:
    """Resolves `path` and rejects it when symlinks or `..` lead outside the data root."""
    resolved = path.resolve()
    if not resolved.is_relative_to(resolved_root):
        raise ValueError(f"{what} resolves to {resolved}, outside the data root {resolved_root}")
    return resolved


def _require_images_in_every_class(files: dict[str, list[Path]], directory: Path) -> None:
    if not files:
        raise ValueError(f"{directory} holds no class folders (expected one folder per class)")
    empty = [name for name, paths in files.items() if not paths]
    if empty:
        extensions = " ".join(sorted(IMAGE_EXTENSIONS))
        raise ValueError(f"class folders without images ({extensions}) in {directory}: {empty}")


def _folder_examples(files: dict[str, list[Path]], folder_names: list[str], root: Path) -> list[Example]:
    resolved_root = root.resolve()
    return [
        Example.from_file(label, path, path.relative_to(resolved_root).as_posix())
        for label, name in enumerate(folder_names)
        for path in files.get(name, [])
    ]


def _class_names_from_folders(folder_names: list[str]) -> list[str]:
    names = [_display_name(name) for name in folder_names]
    _require_unique_names(names)
    return names


def _display_name(raw: str) -> str:
    # Undecodable bytes in a folder name arrive as lone surrogates (os.fsdecode): no server can
    # tokenise them, and they cannot even be sent as UTF-8.
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            f"class name {raw!r} is not valid UTF-8 text (undecodable bytes in a folder name?); rename it"
        ) from None
    return raw.replace("_", " ").strip()


def _require_unique_names(names: list[str]) -> None:
    # Two classes with one name would get identical text prompts and be indistinguishable.
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"class names collide after replacing underscores with spaces: {duplicates}")


# CoOp split files ----------------------------------------------------------------------------

_CoopEntry = tuple[str, int, str]


def _parse_coop_spec(rest: str) -> tuple[Path, Path]:
    parts = rest.split(":")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"a CoOp spec reads 'coop:SPLIT_JSON:IMAGE_ROOT', got 'coop:{rest}'")
    return Path(parts[0]).expanduser(), Path(parts[1]).expanduser()


def _load_coop(split_json: Path, image_root: Path) -> Dataset:
    if not split_json.is_file():
        raise DatasetUnavailable(f"CoOp split file {split_json} not found")
    if not image_root.is_dir():
        raise DatasetUnavailable(f"CoOp image root {image_root} does not exist or is not a directory")
    payload = json.loads(split_json.read_text(encoding="utf-8"))
    if not isinstance(payload, dict) or "train" not in payload or "test" not in payload:
        raise ValueError(f"{split_json}: expected an object with 'train', 'test' and optionally 'val' lists")
    entries = {
        split: _parse_coop_entries(payload[split], split, split_json)
        for split in ("train", "val", "test")
        if split in payload
    }
    class_names = _coop_class_names(entries, split_json)
    resolved_root = image_root.resolve()
    examples = {
        split: _coop_examples(split_entries, split, image_root, resolved_root)
        for split, split_entries in entries.items()
    }
    return Dataset(
        name=split_json.stem,
        class_names=class_names,
        train=examples["train"],
        test=examples["test"],
        val=examples.get("val"),
    )


def _parse_coop_entries(raw: Any, split: str, split_json: Path) -> list[_CoopEntry]:
    if not isinstance(raw, list):
        raise ValueError(f"{split_json}: '{split}' must be a list of [path, label, class name]")
    entries: list[_CoopEntry] = []
    for position, item in enumerate(raw):
        valid = (
            isinstance(item, list | tuple)
            and len(item) == 3
            and isinstance(item[0], str)
            and isinstance(item[1], int)
            and not isinstance(item[1], bool)
            and item[1] >= 0
            and isinstance(item[2], str)
        )
        if not valid:
            raise ValueError(
                f"{split_json}: {split}[{position}] = {item!r} is not [relative path, label >= 0, class name]"
            )
        entries.append((item[0], item[1], item[2]))
    return entries


def _coop_class_names(entries: dict[str, list[_CoopEntry]], split_json: Path) -> list[str]:
    by_label: dict[int, str] = {}
    for split_entries in entries.values():
        for _, label, raw_name in split_entries:
            name = _display_name(raw_name)
            if by_label.setdefault(label, name) != name:
                raise ValueError(
                    f"{split_json}: label {label} is called both {by_label[label]!r} and {name!r}"
                )
    missing = sorted(set(range(len(by_label))) - set(by_label))
    if missing:
        raise ValueError(f"{split_json}: labels must run 0..C-1 without gaps; missing {missing[:10]}")
    names = [by_label[label] for label in range(len(by_label))]
    _require_unique_names(names)
    return names


def _coop_examples(
    entries: list[_CoopEntry], split: str, image_root: Path, resolved_root: Path
) -> list[Example]:
    examples: list[Example] = []
    missing: list[str] = []
    for position, (rel_path, label, _) in enumerate(entries):
        where = f"CoOp entry {split}[{position}] ({rel_path!r})"
        if PurePosixPath(rel_path).is_absolute() or PureWindowsPath(rel_path).is_absolute():
            raise ValueError(f"{where} is an absolute path; entries must be relative to the image root")
        path = _require_inside(image_root / rel_path, resolved_root, where)
        if not path.is_file():
            missing.append(rel_path)
            continue
        examples.append(Example.from_file(label, path, rel_path))
    if missing:
        raise DatasetUnavailable(
            f"{len(missing)} images of the CoOp {split} split are missing under {image_root}, "
            f"e.g. {missing[:3]}"
        )
    return examples


# --------------------------------------------------------------------------------------------
# The few-shot protocol


def few_shot_split(
    dataset: Dataset,
    shots: int,
    seed: int,
    *,
    val_per_class: int | None = None,
    max_test_per_class: int | None = None,
    allow_fewer: bool = False,
) -> FewShotSplit:
    """Draws K shots per class and a disjoint validation set; the test set is never sampled from.

    Validation comes from `dataset.val` when given, else from the training pool left after the
    shots; it holds min(K, 4) images per class unless `val_per_class` says otherwise.
    A class with too few images is an error (a K-shot benchmark must not quietly become another),
    unless `allow_fewer`: then it gives what it has (see `_split_short_pool`), one warning names
    such classes, and `short_classes` records them.
    `max_test_per_class` subsamples the test set with a fixed seed, identical for all `seed`s.
    Train and validation are ordered by class, then by position in the data set; the test set
    keeps the data set's order.
    """
    if shots < 1:
        raise ValueError(f"shots must be at least 1, got {shots}")
    _check_seed(seed)
    n_val = min(shots, _MAX_DEFAULT_VAL_PER_CLASS) if val_per_class is None else val_per_class
    if n_val < 0:
        raise ValueError(f"val_per_class must be non-negative, got {n_val}")
    if max_test_per_class is not None and max_test_per_class < 1:
        raise ValueError(f"max_test_per_class must be at least 1, got {max_test_per_class}")
    if not dataset.test:
        raise ValueError(f"{dataset.name} has no test examples")
    if len(dataset.class_names) < 2:
        raise ValueError(
            f"{dataset.name} has {len(dataset.class_names)} class; a classifier needs at least 2"
        )

    train, val, short = _draw_train_and_val(dataset, shots, seed, n_val, allow_fewer=allow_fewer)
    if short:
        logger.warning(
            "%s: %d of %d classes have fewer than %d shots + %d validation images; using what they have "
            "(training shots: %s)",
            dataset.name,
            len(short),
            len(dataset.class_names),
            shots,
            n_val,
            ", ".join(f"{name} {k}" for name, k in list(short.items())[:10])
            + (", ..." if len(short) > 10 else ""),
        )
    test = _subsample_test(dataset, max_test_per_class)
    _require_disjoint(train, val, dataset.test)
    logger.info(
        "%s: %d-shot split with seed %d: %d train, %d val, %d test images",
        dataset.name,
        shots,
        seed,
        len(train),
        len(val),
        len(test),
    )
    return FewShotSplit(
        class_names=list(dataset.class_names),
        train=train,
        val=val,
        test=test,
        shots=shots,
        seed=seed,
        short_classes=short,
    )


def _draw_train_and_val(
    dataset: Dataset, shots: int, seed: int, n_val: int, *, allow_fewer: bool
) -> tuple[list[Example], list[Example], dict[str, int]]:
    num_classes = len(dataset.class_names)
    train_pool = _pool_by_class(dataset.train, num_classes, "train")
    val_pool = None if dataset.val is None else _pool_by_class(dataset.val, num_classes, "val")
    train: list[Example] = []
    val: list[Example] = []
    short: dict[str, int] = {}
    for label, pool in enumerate(train_pool):
        given = None if val_pool is None else val_pool[label]
        k, v = _shots_and_val(dataset, label, len(pool), given, shots, n_val, allow_fewer=allow_fewer)
        if k < shots:
            short[dataset.class_names[label]] = k
        order = _rng(_STREAM_SHOTS, seed, label).permutation(len(pool))
        train.extend(pool[i] for i in sorted(order[:k]))
        if given is None:
            val.extend(pool[i] for i in sorted(order[k : k + v]))
            continue
        val_order = _rng(_STREAM_VAL, seed, label).permutation(len(given))
        val.extend(given[i] for i in sorted(val_order[:v]))
    return train, val, short


def _shots_and_val(
    dataset: Dataset,
    label: int,
    available: int,
    given: list[Example] | None,
    shots: int,
    n_val: int,
    *,
    allow_fewer: bool,
) -> tuple[int, int]:
    """(training shots, validation images) to draw for one class; too few images is an error
    unless `allow_fewer` (and even then a class needs one training image)."""
    enough = available >= shots + n_val if given is None else available >= shots and len(given) >= n_val
    if enough:
        return shots, n_val
    if given is None:
        if not allow_fewer or available == 0:
            _require_enough(
                dataset, label, available, shots + n_val, f"{shots} shots + {n_val} validation images"
            )
        return _split_short_pool(available, shots, n_val)
    if not allow_fewer or available == 0:
        _require_enough(dataset, label, available, shots, f"{shots} shots")
        _require_enough(dataset, label, len(given), n_val, f"{n_val} images from the given val split")
    return min(shots, available), min(n_val, len(given))


def _split_short_pool(available: int, shots: int, n_val: int) -> tuple[int, int]:
    """(shots, validation images) from a class's pool of fewer than shots + n_val images: about
    one image in five for validation (at least one, once there are two), the rest to train."""
    v = min(n_val, max(1, available // 5)) if available >= 2 else 0
    return min(shots, available - v), v


def _pool_by_class(examples: list[Example], num_classes: int, split: str) -> list[list[Example]]:
    pools: list[list[Example]] = [[] for _ in range(num_classes)]
    for example in examples:
        if not 0 <= example.label < num_classes:
            raise ValueError(
                f"{split} example {example.source} has label {example.label}, outside 0..{num_classes - 1}"
            )
        pools[example.label].append(example)
    return pools


def _require_enough(dataset: Dataset, label: int, available: int, needed: int, purpose: str) -> None:
    if available < needed:
        raise ValueError(
            f"{dataset.name}: class {label} ({dataset.class_names[label]!r}) has {available} images, "
            f"too few for {purpose}"
        )


def _subsample_test(dataset: Dataset, max_per_class: int | None) -> list[Example]:
    if max_per_class is None:
        return list(dataset.test)
    keep: set[int] = set()
    for label, positions in sorted(_positions_by_label(e.label for e in dataset.test).items()):
        if len(positions) <= max_per_class:
            keep.update(positions)
            continue
        order = _rng(_STREAM_TEST_SUBSET, _TEST_SUBSET_SEED, label).permutation(len(positions))
        keep.update(positions[i] for i in order[:max_per_class])
    return [example for position, example in enumerate(dataset.test) if position in keep]


def _require_disjoint(train: list[Example], val: list[Example], test: list[Example]) -> None:
    """Guards against split files that list one image twice: that would leak test into selection."""
    test_sources = {e.source for e in test}
    leaked = sorted({e.source for e in [*train, *val]} & test_sources)
    if leaked:
        raise ValueError(f"{len(leaked)} selected train/val images are also test images, e.g. {leaked[:3]}")
    overlap = sorted({e.source for e in train} & {e.source for e in val})
    if overlap:
        raise ValueError(f"{len(overlap)} training shots are also validation images, e.g. {overlap[:3]}")
