"""DataModules over tiny datasets written here in the real on-disk formats, read by the project's readers.

CIFAR-10: Python 2 pickles like the release's (keys b"data", b"labels"); MNIST: big-endian idx files (read
by torchvision's reader after a header check); image folders: PNGs written by PIL. Nothing is downloaded.
Damaged files and every image mode: test_data_faults.py.
"""

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from diffusion.config import CIFAR10DataConfig, DigitsDataConfig, ImageFolderDataConfig, MNISTDataConfig, validate
from diffusion.data import FashionMNISTDataModule, MNISTDataModule
from diffusion.errors import UserError
from helpers import build, train_cfg


# --- writers for the real formats ---------------------------------------------------------------------
class _Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 byte strings, as the CIFAR-10 release (pickled by Python 2) has them."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_string(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_string
    dispatch[bytes] = save_py2_string


def write_py2_pickle(path: Path, obj) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


def cifar_pattern(index: int) -> np.ndarray:
    """A distinct, left-right asymmetric uint8 image (3, 32, 32) per index."""
    c, h, w = np.meshgrid(np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    return ((index * 37 + c * 80 + h * 5 + w * 3) % 256).astype(np.uint8)


def write_cifar(root: Path, images: np.ndarray, n_test: int) -> None:
    """cifar-10-batches-py/ with data_batch_1..5 (train split in order), test_batch (the last n_test), meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rows = images.reshape(len(images), 3072)  # (N, 3072): 1024 R, then G, then B, row-major
    train, test = np.array_split(rows[: len(rows) - n_test], 5), rows[len(rows) - n_test :]
    for i, batch in enumerate([*train, test]):
        name = f"data_batch_{i + 1}" if i < 5 else "test_batch"
        write_py2_pickle(folder / name, {"batch_label": name, "labels": [i % 10] * len(batch), "data": batch,
                                         "filenames": [f"img_{i}_{j}.png" for j in range(len(batch))]})
    meta = {"num_cases_per_batch": 10000, "num_vis": 3072, "label_names": [f"class{k}" for k in range(10)]}
    write_py2_pickle(folder / "batches.meta", meta)


def write_idx(raw: Path, prefix: str, images: np.ndarray) -> None:
    """MNIST idx files: magic 0x00000803 / 0x00000801, big-endian sizes, then the uint8 bytes."""
    raw.mkdir(parents=True, exist_ok=True)
    n, rows, cols = images.shape
    (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, n, rows, cols) + images.tobytes())
    labels = np.arange(n, dtype=np.uint8) % 10
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, n) + labels.tobytes())


def first_epoch(loader) -> list[torch.Tensor]:
    return [batch.clone() for batch in loader]


def on_grid(k: torch.Tensor) -> torch.Tensor:
    """k / 127.5 - 1 computed in float64, rounded once to float32."""
    return (k.double() / 127.5 - 1).float()


def assert_on_grid(x: torch.Tensor) -> None:
    """float32, within [-1, 1], and exactly (the float32 nearest to) k / 127.5 - 1 for integers k."""
    assert x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(x, on_grid(((x.double() + 1) * 127.5).round()), rtol=0, atol=0)


# --- digits ---------------------------------------------------------------------------------------------
def test_digits_batches_are_on_the_256_level_grid():
    data = build(DigitsDataConfig, batch_size=32)
    assert (data.channels, data.image_size) == (1, 8)  # known before setup
    data.setup("fit")
    train, val = first_epoch(data.train_dataloader()), first_epoch(data.val_dataloader())
    assert len(train) == 1500 // 32 and all(b.shape == (32, 1, 8, 8) for b in train)  # drop_last
    assert sum(len(b) for b in val) == 297  # val keeps its last partial batch
    assert_on_grid(torch.cat(train + val))


def test_digits_pixels_round_trip_and_split_partitions_the_set():
    data = build(DigitsDataConfig, batch_size=16)
    got = torch.cat([data.reference_images("train", 10_000), data.reference_images("val", 10_000)])
    assert got.dtype == torch.uint8 and got.shape == (1797, 1, 8, 8)
    expected = np.rint(load_digits().images * 255 / 16).astype(np.uint8)  # 0..16 -> 0..255
    assert sorted(map(bytes, got.reshape(1797, -1).numpy())) == sorted(map(bytes, expected.reshape(1797, -1)))


def test_digits_split_is_fixed_but_shuffling_follows_the_seed():
    a, a_again, b = (build(DigitsDataConfig, batch_size=64, seed=seed) for seed in (1, 1, 2))
    assert torch.equal(a.reference_images("val", 297), b.reference_images("val", 297))
    loader, loader_again = a.train_dataloader(), a_again.train_dataloader()
    epochs, epochs_again = [first_epoch(loader) for _ in range(2)], [first_epoch(loader_again) for _ in range(2)]
    for epoch, epoch_again in zip(epochs, epochs_again, strict=True):  # same seed: same batches, every epoch
        assert all(torch.equal(x, y) for x, y in zip(epoch, epoch_again, strict=True))
    assert not torch.equal(epochs[0][0], epochs[1][0])  # a new permutation each epoch
    assert not torch.equal(epochs[0][0], first_epoch(b.train_dataloader())[0])  # another seed, another order


def test_digits_refuse_flips_and_bad_sizes(tmp_path):
    """The config says so before anything is built (config/validation.py); a batch larger than the split, at setup."""
    with pytest.raises(UserError, match="data.random_flip=false"):
        validate(train_cfg(tmp_path, "data.random_flip=true"))
    with pytest.raises(UserError, match="got 0"):
        validate(train_cfg(tmp_path, "data.batch_size=0"))
    with pytest.raises(UserError, match=r"fewer than one batch \(data.batch_size=4096\)"):
        build(DigitsDataConfig, batch_size=4096).setup("fit")


def test_val_loader_with_a_worker_matches_the_main_process():
    data = build(DigitsDataConfig, batch_size=100, num_workers=1)
    loader = data.val_dataloader()
    assert loader.persistent_workers and not build(DigitsDataConfig).val_dataloader().persistent_workers
    expected = build(DigitsDataConfig, batch_size=100).val_dataloader()
    assert all(torch.equal(x, y) for x, y in zip(loader, expected, strict=True))


# --- CIFAR-10 ---------------------------------------------------------------------------------------------
def test_cifar10_pickles_round_trip(tmp_path):
    images = np.stack([cifar_pattern(i) for i in range(26)])  # 20 train (5 batches of 4), 6 test
    write_cifar(tmp_path, images, n_test=6)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        assert set(pickle.load(f, encoding="bytes")) >= {b"data", b"labels"}  # the release's keys
    data = build(CIFAR10DataConfig, root=str(tmp_path), batch_size=4, random_flip=False)
    assert (data.channels, data.image_size) == (3, 32)
    data.setup("fit")
    assert torch.equal(data.reference_images("train", 100), torch.from_numpy(images[:20]))
    assert torch.equal(data.reference_images("val", 3), torch.from_numpy(images[20:23]))
    val = torch.cat(first_epoch(data.val_dataloader()))
    assert val.shape == (6, 3, 32, 32)
    assert_on_grid(val)
    torch.testing.assert_close(val, on_grid(torch.from_numpy(images[20:])), rtol=0, atol=0)


def test_cifar10_flips_only_train_and_only_when_asked(tmp_path):
    pattern = on_grid(torch.from_numpy(cifar_pattern(0)))
    write_cifar(tmp_path, np.stack([cifar_pattern(0)] * 46), n_test=6)

    def count_flipped(loader) -> tuple[int, int]:
        x = torch.cat(first_epoch(loader))
        as_is, flipped = (x == pattern).flatten(1).all(1), (x == pattern.flip(-1)).flatten(1).all(1)
        assert (as_is | flipped).all()
        return int(flipped.sum()), len(x)

    torch.manual_seed(0)
    data = build(CIFAR10DataConfig, root=str(tmp_path), batch_size=8)  # random_flip defaults to True
    flipped, total = count_flipped(data.train_dataloader())
    assert total == 40 and 5 <= flipped <= 35  # Binomial(40, 1/2)
    assert count_flipped(data.val_dataloader()) == (0, 6)
    no_flip = build(CIFAR10DataConfig, root=str(tmp_path), batch_size=8, random_flip=False)
    assert count_flipped(no_flip.train_dataloader())[0] == 0


def test_cifar10_missing_names_the_path_and_the_switch(tmp_path):
    data = build(CIFAR10DataConfig, root=str(tmp_path / "nowhere"), batch_size=4)
    data.prepare_data()  # download=False: must not fetch anything
    with pytest.raises(UserError, match="data.download=true") as err:
        data.setup("fit")
    assert str(tmp_path / "nowhere") in str(err.value) and "cifar-10-batches-py/data_batch_1" in str(err.value)
    assert "\n" not in str(err.value) and not (tmp_path / "nowhere").exists()


def test_cifar10_fewer_images_than_a_batch_is_an_error(tmp_path):
    write_cifar(tmp_path, np.stack([cifar_pattern(i) for i in range(8)]), n_test=3)
    with pytest.raises(UserError, match="has 5 images, fewer than one batch") as err:
        build(CIFAR10DataConfig, root=str(tmp_path), batch_size=8).setup("fit")
    assert str(tmp_path) in str(err.value)


# --- MNIST, Fashion-MNIST -------------------------------------------------------------------------------
@pytest.mark.parametrize("module, folder", [(MNISTDataModule, "MNIST"), (FashionMNISTDataModule, "FashionMNIST")])
def test_mnist_idx_files_round_trip_padded_with_background(tmp_path, module, folder):
    rng = np.random.default_rng(0)
    train, test = rng.integers(0, 256, (10, 28, 28), dtype=np.uint8), rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / folder / "raw", "train", train)
    write_idx(tmp_path / folder / "raw", "t10k", test)
    data = build(MNISTDataConfig, _target_=f"diffusion.data.{module.__name__}", root=str(tmp_path), batch_size=4)
    assert (data.channels, data.image_size) == (1, 32)
    val = data.reference_images("val", 10)
    assert val.shape == (3, 1, 32, 32) and torch.equal(val[:, 0, 2:30, 2:30], torch.from_numpy(test))
    assert val[:, :, :2].eq(0).all() and val[:, :, 30:].eq(0).all() and val[..., :2].eq(0).all()
    batches = first_epoch(data.train_dataloader())
    assert [b.shape for b in batches] == [(4, 1, 32, 32)] * 2
    assert_on_grid(torch.cat(batches))
    unpadded = build(MNISTDataConfig, _target_=f"diffusion.data.{module.__name__}", root=str(tmp_path), batch_size=4,
                     image_size=28)
    assert torch.equal(unpadded.reference_images("train", 10)[:, 0], torch.from_numpy(train))


def test_mnist_missing_and_too_small(tmp_path):
    with pytest.raises(UserError, match=r"MNIST not found under .*MNIST/raw/train-images-idx3-ubyte.*download=true"):
        build(MNISTDataConfig, root=str(tmp_path), batch_size=4).setup("fit")
    with pytest.raises(UserError, match="data.image_size=32"):  # the config's rule, before anything is built
        validate(train_cfg(tmp_path, "data=mnist", f"data.root={tmp_path}", "data.image_size=16"))


# --- image folders ----------------------------------------------------------------------------------------
def rgb_pattern(height: int, width: int, offset: int) -> np.ndarray:
    h, w, c = np.meshgrid(np.arange(height), np.arange(width), np.arange(3), indexing="ij")
    return ((offset + h * 29 + w * 7 + c * 90) % 256).astype(np.uint8)


def write_folder(root: Path) -> dict[str, np.ndarray]:
    """PNGs in nested folders, mixed sizes and modes; returns the expected 8x8 RGB images of the exact ones."""
    (root / "sub" / "deeper").mkdir(parents=True)
    rgb, grey, rgba = rgb_pattern(8, 8, 0), rgb_pattern(8, 8, 50)[..., 0], rgb_pattern(8, 8, 100)
    tall = np.full((12, 8, 3), 255, np.uint8)
    tall[2:10] = rgb_pattern(8, 8, 150)  # the center square survives the crop
    Image.fromarray(rgb).save(root / "a.png")
    Image.fromarray(grey).save(root / "sub" / "b.png")  # mode L
    Image.fromarray(np.dstack([rgba, np.full((8, 8), 77, np.uint8)])).save(root / "sub" / "c.png")  # RGBA, on black
    Image.fromarray(tall).save(root / "sub" / "deeper" / "d.png")
    Image.fromarray(rgb_pattern(20, 30, 9)).save(root / "e.png")  # resized
    Image.fromarray(rgb_pattern(8, 8, 0)).convert("P").save(root / "sub" / "f.png")  # palette
    (root / ".hidden").mkdir()
    (root / ".hidden" / "junk.png").write_bytes(b"not an image")  # skipped, like notes.txt
    (root / "notes.txt").write_text("not an image")
    over_black = (rgba.astype(np.int64) * 77 * 2 + 255) // 510  # round(c * 77 / 255)
    return {"a": rgb, "b": np.dstack([grey] * 3), "c": over_black.astype(np.uint8), "d": tall[2:10]}


def test_image_folder_round_trips_crops_and_converts(tmp_path):
    expected = write_folder(tmp_path)
    data = build(ImageFolderDataConfig, root=str(tmp_path), batch_size=2, image_size=8, val_fraction=0.2)
    assert (data.channels, data.image_size) == (3, 8)
    data.setup("fit")
    train, val = data.reference_images("train", 100), data.reference_images("val", 100)
    assert (len(train), len(val)) == (5, 1) and train.dtype == torch.uint8
    got = torch.cat([train, val])  # (6, 3, 8, 8)
    for name, image in expected.items():
        assert any(torch.equal(g, torch.from_numpy(image).permute(2, 0, 1)) for g in got), name
    batches = first_epoch(data.train_dataloader())
    assert [b.shape for b in batches] == [(2, 3, 8, 8)] * 2
    assert_on_grid(torch.cat(batches))
    grey = build(ImageFolderDataConfig, root=str(tmp_path), batch_size=2, image_size=4, channels=1)
    assert grey.reference_images("train", 100).shape == (5, 1, 4, 4)


def test_image_folder_split_is_fixed_across_seeds(tmp_path):
    for i in range(20):
        Image.fromarray(rgb_pattern(6, 6, i)).save(tmp_path / f"{i:02d}.png")
    a = build(ImageFolderDataConfig, root=str(tmp_path), batch_size=4, image_size=6, seed=0, val_fraction=0.25)
    b = build(ImageFolderDataConfig, root=str(tmp_path), batch_size=4, image_size=6, seed=5, val_fraction=0.25)
    assert torch.equal(a.reference_images("val", 100), b.reference_images("val", 100))
    assert len(a.reference_images("val", 100)) == 5 and len(a.reference_images("train", 100)) == 15


def test_image_folder_empty_or_missing(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(UserError, match=f"{tmp_path / 'empty'} has 0 images"):
        build(ImageFolderDataConfig, root=str(tmp_path / "empty"), batch_size=2).setup("fit")
    with pytest.raises(UserError, match=f"{tmp_path / 'missing'} does not exist.*data.root="):
        build(ImageFolderDataConfig, root=str(tmp_path / "missing"), batch_size=2).setup("fit")


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_image_folder_names_the_first_truncated_file(tmp_path, suffix):
    write_folder(tmp_path)
    Image.fromarray(rgb_pattern(64, 64, 3)).save(tmp_path / f"whole{suffix}")
    whole = (tmp_path / f"whole{suffix}").read_bytes()
    (tmp_path / "sub" / f"cut{suffix}").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UserError, match="1 of 8 image files .* cannot be used") as err:
        build(ImageFolderDataConfig, root=str(tmp_path), batch_size=2, image_size=8).setup("fit")
    assert str(tmp_path / "sub" / f"cut{suffix}") in str(err.value) and "remove" in str(err.value)
    assert "\n" not in str(err.value)
