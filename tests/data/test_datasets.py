import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wasi_tool.data import BatchTransform, load_data
from wasi_tool.errors import WasiToolError


def test_digits_split_is_seeded_and_disjoint() -> None:
    a = load_data("digits", 32, val_fraction=0.2, seed=0)
    b = load_data("digits", 32, val_fraction=0.2, seed=0)
    assert len(a.train) + len(a.test) == 1797 and len(a.test) == 360
    assert torch.equal(a.test.images, b.test.images)  # type: ignore[attr-defined]
    assert a.num_classes == 10


def test_batch_transform_shapes_and_normalisation() -> None:
    t = BatchTransform(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    gray = torch.full((2, 8, 8, 1), 255, dtype=torch.uint8)
    out = t(gray)
    assert out.shape == (2, 3, 16, 16)
    torch.testing.assert_close(out, torch.ones_like(out))


def test_npz(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(
        path,
        x_train=rng.integers(0, 255, (20, 32, 32, 3), dtype=np.uint8),
        y_train=np.arange(20) % 4,
        x_test=rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8),
        y_test=np.arange(8) % 4,
    )
    splits = load_data(path, 32)
    assert (len(splits.train), len(splits.test), splits.num_classes) == (20, 8, 4)
    sub = load_data(path, 32, classes=[2, 3])
    assert len(sub.train) == 10 and sub.classes == ["2", "3"]
    assert {y for _, y in sub.test} == {0, 1}  # type: ignore[attr-defined]
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=np.zeros((2, 4, 4, 3), dtype=np.uint8))
    with pytest.raises(WasiToolError, match="lacks the arrays y_train, x_test, y_test"):
        load_data(bad, 32)


@pytest.mark.parametrize(
    ("y_train", "message"),
    [
        (np.array([0, 1, 2, 2**40]), "label 1099511627776 is out of range"),  # was 22 GB, killed
        (np.array([0, 1, -3, 1]), "label -3 is out of range"),
        (np.array([0.0, 1.0, 1.0, 0.0]), "labels must be integers, got float64"),
        (np.array(["a", "b", "a", "b"]), "labels must be integers"),
        (np.array([0, 1, 1]), "4 images but labels of shape (3,)"),
    ],
)
def test_npz_labels_are_validated_before_anything_is_sized_by_them(
    tmp_path: Path, y_train: np.ndarray, message: str
) -> None:
    import resource

    path = tmp_path / "d.npz"
    x = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    np.savez(path, x_train=x, y_train=y_train, x_test=x, y_test=np.arange(4) % 2)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(WasiToolError, match=re.escape(message)):
        load_data(path, 32)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 200_000  # refused within bounded memory (the old loader needed 22 GB)


def test_cifar_batches_without_running_code(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(1, 3):
        batch = {"data": rng.integers(0, 255, (6, 3072), dtype=np.uint8), "labels": [0, 1, 2] * 2}
        (tmp_path / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    test = {"data": rng.integers(0, 255, (3, 3072), dtype=np.uint8), "labels": [0, 1, 2]}
    (tmp_path / "test_batch").write_bytes(pickle.dumps(test))
    (tmp_path / "batches.meta").write_bytes(pickle.dumps({"label_names": ["a", "b", "c"]}))
    splits = load_data(tmp_path, 32)
    assert (len(splits.train), len(splits.test), splits.classes) == (12, 3, ["a", "b", "c"])
    image, _ = splits.train[0]
    assert image.shape == (32, 32, 3)

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("pwned",))

    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({"data": Evil(), "labels": []}))
    with pytest.raises(WasiToolError, match="refusing to load"):
        load_data(tmp_path, 32)


def _write_images(root: Path, sizes: dict[str, list[tuple[int, int, str]]]) -> None:
    for cls, items in sizes.items():
        (root / cls).mkdir(parents=True)
        for k, (w, h, mode) in enumerate(items):
            Image.new(mode, (w, h), color=k * 40).save(root / cls / f"{k}.png")


def test_image_folders_mixed_sizes_and_grayscale(tmp_path: Path) -> None:
    _write_images(tmp_path, {"cat": [(20, 30, "RGB"), (8, 8, "L")] * 3, "dog": [(40, 40, "L")] * 6})
    splits = load_data(tmp_path, 24, val_fraction=0.25, seed=0)
    assert splits.classes == ["cat", "dog"] and len(splits.test) == 3 and len(splits.train) == 9
    for i in range(len(splits.train)):  # type: ignore[arg-type]
        image, label = splits.train[i]
        assert image.shape == (24, 24, 3) and image.dtype == torch.uint8 and label in (0, 1)


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(WasiToolError, match="no class folders"):
        load_data(tmp_path, 24)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(WasiToolError, match="no images found"):
        load_data(tmp_path, 24)
    (tmp_path / "empty_class" / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "empty_class" / "ok.png").write_bytes(b"")
    splits = load_data(tmp_path, 24, val_fraction=0.5)
    with pytest.raises(WasiToolError, match="cannot read image"):
        [splits.train[i] for i in range(len(splits.train))]  # type: ignore[arg-type]
    with pytest.raises(WasiToolError, match="no such dataset"):
        load_data(tmp_path / "nope", 24)


def test_pixels_are_validated_and_conversions_are_stated(tmp_path: Path) -> None:
    """uint8 passes untouched; floats in [0, 1] are scaled by 255 and floats in [0, 255] are
    rounded, each stated in the description; integers 0..255 are cast; the rest is refused."""
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (6, 4, 4, 3)).astype(np.uint8)
    y = np.arange(6) % 3

    def load(x: np.ndarray) -> tuple[torch.Tensor, str]:
        path = tmp_path / "d.npz"
        np.savez(path, x_train=x, y_train=y, x_test=x, y_test=y)
        splits = load_data(path, size=4)
        return splits.train.images, splits.description  # type: ignore[attr-defined]

    images, text = load(raw)
    assert torch.equal(images, torch.from_numpy(raw)) and "pixels" not in text
    images, text = load(raw.astype(np.float32) / 255.0)
    assert torch.equal(images, torch.from_numpy(raw))
    assert "float pixels in [0, 1] read as 0-1 and scaled to 0-255" in text
    images, text = load(np.clip(raw.astype(np.float64) + 0.2, 0, 255))
    assert torch.equal(images, torch.from_numpy(raw)) and "rounded" in text
    images, _ = load(raw.astype(np.int32))
    assert torch.equal(images, torch.from_numpy(raw))
    for bad, message in [
        (np.where(raw > 200, np.inf, raw.astype(np.float32)), "pixels are NaN or infinite"),
        (raw.astype(np.int32) + 1, r"pixel values span \[1, 256\]"),
        (raw > 100, "pixels must be numbers, got dtype bool"),
        (raw[:, :, :, :2], r"got \(6, 4, 4, 2\)"),
    ]:
        with pytest.raises(WasiToolError, match=message):
            load(bad)


def test_an_npz_is_sized_from_its_headers_before_it_is_read(tmp_path: Path) -> None:
    """A compressed .npz of zeros decodes to far more than its size on disk: the decoded size
    is read from each .npy header and refused above the bound, before any data is read."""
    from wasi_tool.data import datasets

    path = tmp_path / "zeros.npz"
    x = np.zeros((64, 32, 32, 3), np.uint8)
    np.savez_compressed(path, x_train=x, y_train=np.zeros(64, int), x_test=x, y_test=[0])
    assert path.stat().st_size < 10_000  # 196 KB of pixels on disk in a few KB
    datasets._check_npz_sizes(path, bound=x.nbytes)  # exactly at the bound: accepted
    with pytest.raises(WasiToolError, match=r"x_train would decode to 0.0 GB \(shape \(64, 32"):
        datasets._check_npz_sizes(path, bound=x.nbytes - 1)


@pytest.mark.slow
def test_a_huge_label_is_refused_under_an_address_space_limit(tmp_path: Path) -> None:
    """The CLI, in a process limited to 5 GiB of address space (torch and OpenBLAS need about
    3): a label of 2**40 is one line and exit 1. Before the validator, finetune built a list of
    2**40 class names and grew to 22.6 GB until the kernel killed it."""
    import resource
    import subprocess
    import sys

    path = tmp_path / "huge.npz"
    x = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    np.savez(path, x_train=x, y_train=np.array([0, 1, 2**40, 1]), x_test=x, y_test=[0, 1, 0, 1])
    limit = 5 << 30

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    argv = [sys.executable, "-m", "wasi_tool", "finetune", "--random-init", "--arch"]
    argv += ["vit_tiny_patch16_224", "--img-size", "32", "--data", str(path)]
    argv += ["--out", str(tmp_path / "out")]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run(
        argv, capture_output=True, text=True, preexec_fn=cap, env=env, timeout=300, check=False
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        f"error: {path}: label 1099511627776 is out of range (labels are 0..99999)"
    ]
    assert not (tmp_path / "out").exists()
