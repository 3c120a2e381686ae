"""Offline datasets: scikit-learn digits, .npz arrays, CIFAR python batches, image folders.

Images are kept as uint8 (H, W, C) until a batch is formed; ``BatchTransform`` then resizes and
normalises the whole batch at once to what the model expects.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import math
import os
import pickle
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from wasi_tool.errors import WasiToolError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class ArrayDataset(Dataset[tuple[torch.Tensor, int]]):
    """uint8 images (N, H, W, C) in memory with integer labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        if images.ndim == 3:  # grayscale (N, H, W)
            images = images[..., None]
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise WasiToolError(f"expected images shaped (N, H, W[, C]), got {images.shape}")
        if len(images) != len(labels):
            raise WasiToolError(f"{len(images)} images but {len(labels)} labels")
        self.images = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8))
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, int]:
        return self.images[idx], int(self.labels[idx])


class ImageFolderDataset(Dataset[tuple[torch.Tensor, int]]):
    """``root/<class>/<image>`` files decoded on access to RGB uint8, resized to ``size``."""

    def __init__(self, files: Sequence[Path], labels: Sequence[int], size: int) -> None:
        self.files, self.labels, self.size = list(files), list(labels), size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, int]:
        from PIL import Image, UnidentifiedImageError

        path = self.files[idx]
        try:
            # Pillow warns above MAX_IMAGE_PIXELS (89 M) and refuses above twice that: both
            # refuse here, before a decompression bomb is decoded.
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as img:
                    rgb = img.convert("RGB").resize(
                        (self.size, self.size), Image.Resampling.BILINEAR
                    )
                    arr = np.asarray(rgb, dtype=np.uint8).copy()
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise WasiToolError(f"refusing image {path}: {exc}") from None
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise WasiToolError(f"cannot read image {path}: {exc}") from None
        return torch.from_numpy(arr), self.labels[idx]


@dataclass
class DataSplits:
    """Train and evaluation sets, the class names, and a line saying what the data is."""

    train: Dataset[tuple[torch.Tensor, int]]
    test: Dataset[tuple[torch.Tensor, int]]
    classes: list[str]
    description: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class BatchTransform:
    """uint8 (B, H, W, C) -> float (B, 3, S, S): to [0, 1], resize (bilinear), normalise.

    With ``resize`` (torchvision's ImageNet eval transform): the shorter side is resized to
    ``resize`` (``interpolation``, antialiased), then the center ``size`` x ``size`` is cropped.
    """

    def __init__(
        self,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        resize: int | None = None,
        interpolation: str = "bilinear",
    ) -> None:
        self.size = size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.resize, self.interpolation = resize, interpolation

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.resize is not None:
            return (self._resize_crop(x) - self.mean) / self.std
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std

    def _resize_crop(self, x: torch.Tensor) -> torch.Tensor:
        assert self.resize is not None
        h, w = x.shape[-2:]
        short = min(h, w)
        new = (
            (self.resize, self.resize * w // h)
            if h == short
            else (self.resize * h // w, self.resize)
        )
        if (h, w) != new:
            x = F.interpolate(
                x, size=new, mode=self.interpolation, align_corners=False, antialias=True
            )
        # torchvision's center crop: offsets rounded to nearest
        top, left = (round((n - self.size) / 2.0) for n in new)
        if top < 0 or left < 0:
            raise WasiToolError(f"cannot crop {self.size} px from images resized to {new}")
        return x[..., top : top + self.size, left : left + self.size]


def _split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded (train, held-out) index split with ceil(fraction * n) held out."""
    if not 0.0 < fraction < 1.0:
        raise WasiToolError(f"validation fraction must be in (0, 1), got {fraction}")
    order = np.random.default_rng(seed).permutation(n)
    held = max(1, math.ceil(fraction * n))
    return np.sort(order[held:]), np.sort(order[:held])


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images (1797, 8, 8) float64 in 0..16 and int labels.

    Read from the ``digits.csv.gz`` that scikit-learn ships, found without importing it: its
    import (scipy, joblib, ~900 modules) adds ~70 MB to the resident floor of a training process
    and ~1.5 s. The same values as ``sklearn.datasets.load_digits()``, which is the fallback when
    the file is not where scikit-learn keeps it.
    """
    spec = importlib.util.find_spec("sklearn")  # locates the package, does not run it
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, "rt") as f:
                data = np.loadtxt(f, delimiter=",")
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target


def _digits(val_fraction: float, seed: int) -> DataSplits:
    raw, target = _digits_arrays()
    images = np.rint(raw * (255.0 / 16.0)).astype(np.uint8)  # 8x8, 17 grey levels
    train_idx, test_idx = _split(len(images), val_fraction, seed)
    return DataSplits(
        ArrayDataset(images[train_idx], target[train_idx]),
        ArrayDataset(images[test_idx], target[test_idx]),
        [str(i) for i in range(10)],
        f"scikit-learn digits: {len(train_idx)} train / {len(test_idx)} held-out 8x8 images",
    )


MAX_CLASSES = 100_000  # a label above this is refused: class names are built per class


def _label_count(source: str, *splits: tuple[np.ndarray, np.ndarray]) -> int:
    """Validate each split's (images, labels) and return the number of classes: the labels must
    be non-negative integers below MAX_CLASSES, one per image. Checked before anything is sized
    by the labels (a label of 2**40 made a list of 2**40 class names)."""
    top = -1
    for images, labels in splits:
        labels = np.asarray(labels)
        if labels.dtype.kind not in "iu":
            raise WasiToolError(f"{source}: labels must be integers, got {labels.dtype}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise WasiToolError(
                f"{source}: {len(images)} images but labels of shape {tuple(labels.shape)}"
            )
        if labels.size == 0:
            raise WasiToolError(f"{source}: a split has no labels")
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= MAX_CLASSES:
            bad = low if low < 0 else high
            raise WasiToolError(
                f"{source}: label {bad} is out of range (labels are 0..{MAX_CLASSES - 1})"
            )
        top = max(top, high)
    return top + 1


MAX_SIDE = 8192  # pixels per image side: larger arrays are refused, not resized


def _memory_bound() -> int:
    """Bytes a dataset may decode to: half of this machine's physical memory."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _check_npz_sizes(path: Path, bound: int) -> None:
    """Read each array's .npy header (not its data) and refuse one whose decoded size exceeds
    ``bound``: a compressed .npz of zeros can be 1000x smaller than what it decodes to."""
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                with zf.open(info) as member:
                    major, _ = np.lib.format.read_magic(member)
                    read = (
                        np.lib.format.read_array_header_1_0
                        if major == 1
                        else np.lib.format.read_array_header_2_0  # 3.0 differs in encoding only
                    )
                    shape, _, dtype = read(member)
                size = math.prod(shape) * dtype.itemsize
                if size > bound:
                    raise WasiToolError(
                        f"{path}: {info.filename.removesuffix('.npy')} would decode to "
                        f"{size / 1e9:.1f} GB (shape {tuple(shape)}), more than the "
                        f"{bound / 1e9:.1f} GB allowed (half of this machine's memory)"
                    )
    except WasiToolError:
        raise
    except Exception:  # not a zip, not .npy members: np.load reports it below
        return


def _pixels(source: str, images: Any) -> tuple[np.ndarray, str | None]:
    """The images as uint8 (N, H, W[, C]) and a note when they were converted.

    Accepted: uint8; integers in 0..255; floats, all finite, either in [0, 1] (scaled by 255:
    stated) or in [0, 255] (rounded: stated). Anything else is refused with what was found:
    NaN or inf pixels, values out of range, bool/complex/object/string arrays, images larger
    than MAX_SIDE a side.
    """
    images = np.asarray(images)
    kind = images.dtype.kind
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise WasiToolError(
            f"{source}: expected images shaped (N, H, W) or (N, H, W, 1|3), got {images.shape}"
        )
    if min(images.shape[1:3]) < 1 or max(images.shape[1:3]) > MAX_SIDE:
        raise WasiToolError(
            f"{source}: images of {images.shape[1]}x{images.shape[2]} px; each side must be "
            f"1..{MAX_SIDE}"
        )
    if kind not in "uif":
        raise WasiToolError(f"{source}: pixels must be numbers, got dtype {images.dtype}")
    if images.dtype == np.uint8 or images.size == 0:
        return images.astype(np.uint8, copy=False), None
    if kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(images)))
        if bad:
            raise WasiToolError(f"{source}: {bad} pixels are NaN or infinite")
    low, high = float(images.min()), float(images.max())
    if kind == "f" and low >= 0.0 and high <= 1.0:
        scaled = np.rint(images * 255.0).astype(np.uint8)
        return scaled, f"float pixels in [{low:g}, {high:g}] read as 0-1 and scaled to 0-255"
    if low < 0 or high > 255:
        raise WasiToolError(
            f"{source}: pixel values span [{low:g}, {high:g}]; expected uint8 0-255, or floats "
            "in [0, 1]"
        )
    if kind == "f":
        return np.rint(images).astype(np.uint8), f"float pixels in [{low:g}, {high:g}] rounded"
    return images.astype(np.uint8), None


def _npz(path: Path) -> DataSplits:
    _check_npz_sizes(path, _memory_bound())
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in data]
            if missing:
                raise WasiToolError(f"{path} lacks the arrays {', '.join(missing)}")
            arrays = {k: data[k] for k in ("x_train", "y_train", "x_test", "y_test")}
            names = [str(n) for n in data["label_names"]] if "label_names" in data else None
    except WasiToolError:
        raise
    except Exception as exc:  # OSError, ValueError, zipfile.BadZipFile, pickle refusals...
        raise WasiToolError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
    x_train, note = _pixels(f"{path} x_train", arrays["x_train"])
    x_test, _ = _pixels(f"{path} x_test", arrays["x_test"])
    count = _label_count(str(path), (x_train, arrays["y_train"]), (x_test, arrays["y_test"]))
    return DataSplits(
        ArrayDataset(x_train, arrays["y_train"]),
        ArrayDataset(x_test, arrays["y_test"]),
        names if names is not None and len(names) >= count else [str(i) for i in range(count)],
        f"{path.name}: {len(arrays['y_train'])} train / {len(arrays['y_test'])} test images"
        + (f" ({note})" if note else ""),
    )


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches (dicts of numpy arrays, lists, bytes) and nothing that runs code."""

    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise WasiToolError(f"CIFAR batch refers to {module}.{name}; refusing to load it")
        return super().find_class(module, name)


def _cifar_file(path: Path) -> dict[str, object]:
    try:
        raw = _ArrayOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except WasiToolError:
        raise
    except Exception as exc:  # a corrupt pickle fails in many ways
        raise WasiToolError(f"cannot read CIFAR batch {path}: {exc}") from None
    if not isinstance(raw, dict) or "data" not in raw:
        raise WasiToolError(f"{path} is not a CIFAR batch (no 'data')")
    return raw


def _cifar(root: Path) -> DataSplits:
    def images(batch: dict[str, object], path: Path) -> np.ndarray:
        try:
            data = np.asarray(batch["data"])
            if data.dtype.kind not in "ui" or data.size % 3072:
                raise ValueError(f"{data.dtype} array of shape {data.shape}")
            flat = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        except (ValueError, TypeError) as exc:
            raise WasiToolError(
                f"{path}: 'data' is not CIFAR's rows of 3072 pixel bytes ({exc})"
            ) from None
        return _pixels(str(path), flat)[0]

    if (root / "data_batch_1").is_file():  # CIFAR-10
        train_files = [
            root / f"data_batch_{i}" for i in range(1, 6) if (root / f"data_batch_{i}").is_file()
        ]
        test_file = root / "test_batch"
        key, meta_file, names_key = "labels", root / "batches.meta", "label_names"
    else:  # CIFAR-100 (fine labels)
        train_files, test_file = [root / "train"], root / "test"
        key, meta_file, names_key = "fine_labels", root / "meta", "fine_label_names"
    train = [_cifar_file(f) for f in train_files]
    test = _cifar_file(test_file)
    x_train = np.concatenate([images(b, f) for b, f in zip(train, train_files, strict=True)])
    x_test = images(test, test_file)
    try:
        y_train = np.concatenate([np.asarray(b[key]) for b in train])
        y_test = np.asarray(test[key])
    except (KeyError, ValueError, TypeError) as exc:
        raise WasiToolError(f"CIFAR batches in {root}: no usable '{key}': {exc}") from None
    count = _label_count(f"CIFAR batches in {root}", (x_train, y_train), (x_test, y_test))
    names = [str(i) for i in range(count)]
    if meta_file.is_file():
        names = _cifar_names(meta_file, names_key, count)
    return DataSplits(
        ArrayDataset(x_train, y_train),
        ArrayDataset(x_test, y_test),
        names,
        f"CIFAR batches in {root}: {len(y_train)} train / {len(y_test)} test images",
    )


def _cifar_names(meta_file: Path, key: str, count: int) -> list[str]:
    """The class names of a CIFAR meta file: a dict whose ``key`` lists at least ``count``
    names; anything else (corrupt, a list, too few names) is refused."""
    try:
        meta = _ArrayOnlyUnpickler(io.BytesIO(meta_file.read_bytes()), encoding="latin1").load()
    except WasiToolError:
        raise
    except Exception as exc:  # a corrupt pickle fails in many ways
        raise WasiToolError(f"cannot read CIFAR meta file {meta_file}: {exc}") from None
    names = meta.get(key) if isinstance(meta, dict) else None
    if not isinstance(names, (list, tuple)) or len(names) < count:
        found = f"{len(names)} names" if isinstance(names, (list, tuple)) else type(meta).__name__
        raise WasiToolError(
            f"{meta_file} is not a CIFAR meta file: expected a dict whose '{key}' lists "
            f"{count} class names, found {found}"
        )
    return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan(root: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    files, labels = [], []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        for f in sorted(folder.rglob("*")):
            if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                files.append(f)
                labels.append(label)
    return files, labels


def _image_folders(root: Path, size: int, val_fraction: float, seed: int) -> DataSplits:
    eval_dir = next((root / n for n in ("test", "val", "valid") if (root / n).is_dir()), None)
    train_dir = root / "train" if (root / "train").is_dir() and eval_dir is not None else root
    classes = [p.name for p in _class_dirs(train_dir)]
    if not classes:
        raise WasiToolError(f"{train_dir} has no class folders (expected root/<class>/*.jpg)")
    files, labels = _scan(train_dir, classes)
    if not files:
        raise WasiToolError(
            f"no images found under {train_dir} ({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    if eval_dir is not None:
        test_files, test_labels = _scan(eval_dir, classes)
        if not test_files:
            raise WasiToolError(f"no images found under {eval_dir}")
        note = f"{len(files)} train / {len(test_files)} {eval_dir.name} images"
    else:
        tr, te = _split(len(files), val_fraction, seed)
        test_files, test_labels = [files[i] for i in te], [labels[i] for i in te]
        files, labels = [files[i] for i in tr], [labels[i] for i in tr]
        note = f"{len(files)} train / {len(test_files)} held-out images"
    return DataSplits(
        ImageFolderDataset(files, labels, size),
        ImageFolderDataset(test_files, test_labels, size),
        classes,
        f"image folders in {root}: {len(classes)} classes, {note}",
    )


class _Subset(Dataset[tuple[torch.Tensor, int]]):
    def __init__(
        self, base: Dataset[tuple[torch.Tensor, int]], indices: list[int], remap: dict[int, int]
    ):
        self.base, self.indices, self.remap = base, indices, remap

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[self.indices[idx]]
        return image, self.remap[label]


def _labels_of(ds: Dataset[tuple[torch.Tensor, int]]) -> list[int]:
    if isinstance(ds, ArrayDataset):
        return ds.labels.tolist()
    if isinstance(ds, ImageFolderDataset):
        return list(ds.labels)
    return [ds[i][1] for i in range(len(ds))]  # type: ignore[arg-type]


def select_classes(splits: DataSplits, keep: Sequence[int]) -> DataSplits:
    """Only the classes ``keep`` (relabelled 0..len(keep)-1 in that order)."""
    keep = list(dict.fromkeys(int(k) for k in keep))
    bad = [k for k in keep if not 0 <= k < splits.num_classes]
    if bad or not keep:
        raise WasiToolError(f"classes {bad or keep} are not in 0..{splits.num_classes - 1}")
    remap = {old: new for new, old in enumerate(keep)}

    def sub(ds: Dataset[tuple[torch.Tensor, int]]) -> _Subset:
        return _Subset(ds, [i for i, y in enumerate(_labels_of(ds)) if y in remap], remap)

    return DataSplits(
        sub(splits.train),
        sub(splits.test),
        [splits.classes[k] for k in keep],
        f"{splits.description}; classes {','.join(map(str, keep))}",
    )


def load_data(
    spec: str | Path,
    size: int,
    val_fraction: float = 0.1,
    seed: int = 0,
    classes: Sequence[int] | None = None,
) -> DataSplits:
    """The dataset ``spec`` names: ``digits``, a ``.npz`` file, a CIFAR batch folder, or an
    image-folder tree (``root/<class>/*``, or ``root/train|test/<class>/*``)."""
    if str(spec) == "digits":
        splits = _digits(val_fraction if val_fraction else 0.2, seed)
    else:
        path = Path(spec)
        if not path.exists():
            raise WasiToolError(f"no such dataset: {path}")
        if path.is_file() and path.suffix == ".npz":
            splits = _npz(path)
        elif path.is_dir() and ((path / "data_batch_1").is_file() or (path / "train").is_file()):
            splits = _cifar(path)
        elif path.is_dir():
            splits = _image_folders(path, size, val_fraction, seed)
        else:
            raise WasiToolError(f"unsupported dataset {path}: expected digits, .npz, or a folder")
    if classes:
        splits = select_classes(splits, classes)
    if len(splits.train) == 0 or len(splits.test) == 0:  # type: ignore[arg-type]
        raise WasiToolError(f"dataset {spec} has an empty train or test split")
    return splits
