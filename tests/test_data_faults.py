"""Every kind of image file converts to the right uint8 values; every damaged or unusable data file is
named in one line before training. Files are written here in their real formats (PNG, TIFF, JPEG by PIL;
CIFAR-10 pickles and MNIST idx files by the writers of test_data.py).
"""

import http.server
import pickle
import struct
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets

from diffusion.config import CIFAR10DataConfig, ImageFolderDataConfig, MNISTDataConfig, validate
from diffusion.errors import UserError
from helpers import build, run_script, train_cfg
from test_data import cifar_pattern, rgb_pattern, write_cifar, write_idx, write_py2_pickle

# (what the user has, a fragment of the one line it gets): collected for docs/bad_inputs.md
BAD_INPUT_CASES = [
    ("data=image_folder, a truncated PNG in the folder", "cannot be used, first"),
    ("data=image_folder, an image of 200,000,000 pixels (a decompression bomb)",
     "pixels, more than data.max_image_pixels=89478485 (PIL's guard against decompression bombs); if you trust "
     "the file, set data.max_image_pixels="),
    ("data=image_folder data.max_image_pixels=0", "data.max_image_pixels must be null or an integer >= 1, got 0"),
    ("data=image_folder, a float TIFF with values in [0, 255]", "32-bit float values in [0, 255], outside [0, 1]"),
    ("data=image_folder, a 32-bit integer TIFF with values above 65535", "I integer values in"),
    ("data=cifar10, data_batch_3 cut short", "is truncated or corrupt"),
    ("data=cifar10, data_batch_2 a pickle of something else", "is not a CIFAR-10 batch"),
    ("data=mnist, an idx file with the wrong magic number", "not 0x00000803"),
    ("data=mnist, train-images-idx3-ubyte cut short", "is truncated or corrupt"),
    ("data=cifar10 data.download=true, no network or a damaged archive", "could not download CIFAR-10 into"),
]
MESSAGES = dict(BAD_INPUT_CASES)


def load_all(root: Path, channels: int, size: int) -> torch.Tensor:
    """Every image of the folder through the DataModule: uint8 (N, C, size, size), in file order."""
    data = build(ImageFolderDataConfig, root=str(root), batch_size=1, image_size=size, channels=channels,
                 val_fraction=0.5)
    return torch.cat([data.reference_images("train", 100), data.reference_images("val", 100)])


def grey_to(expected: np.ndarray, channels: int) -> np.ndarray:
    """(H, W) expected grey values as the loader's (C, H, W)."""
    return np.stack([expected] * channels)


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma of uint8 (3, H, W), rounded: what an RGB pixel becomes in a grey (channels=1) run."""
    return np.rint(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])[None].astype(np.int64)


# --- every mode to L and RGB -----------------------------------------------------------------------------
V16 = np.array([0, 1, 128, 129, 256, 257, 385, 386, 32767, 32768, 40000, 50000, 65278, 65279, 65534, 65535],
               np.uint16).reshape(4, 4)
F32 = (np.arange(16, dtype=np.float32) / np.float32(15) * np.float32(0.999) + np.float32(0.0004)).reshape(4, 4)
PALETTE = np.array([[200, 100, 50], [10, 220, 30], [255, 255, 255], [0, 0, 0]], np.uint8)
INDICES = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [0, 0, 1, 1], [2, 3, 2, 3]], np.uint8)
ALPHA = np.array([0, 1, 77, 128, 200, 254, 255, 255, 0, 30, 60, 90, 120, 150, 180, 255], np.uint8).reshape(4, 4)


def over_black(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Composite (C, H, W) colours with (H, W) alpha over black, rounded half up: round(c * a / 255)."""
    return np.floor(rgb.astype(np.float64) * alpha / 255 + 0.5).astype(np.int64)


def write_kind(kind: str, path: Path) -> tuple[np.ndarray, bool]:
    """Write one 4x4 image of `kind` in its on-disk format; its expected (C, H, W) values, and whether grey."""
    if kind in ("I;16 PNG", "I;16B TIFF", "I TIFF"):
        stored = {"I;16 PNG": V16, "I;16B TIFF": V16.astype(">u2"), "I TIFF": V16.astype(np.int32)}[kind]
        Image.fromarray(stored).save(path)
        with Image.open(path) as image:
            assert image.mode == kind.split()[0]
        # 16-bit: scaled by 255/65535 and rounded (in integers: no ties, since 2v*255 is never an odd multiple of 65535)
        return ((V16.astype(np.int64) * 255 * 2 + 65535) // (2 * 65535))[None], True
    if kind == "F TIFF":
        Image.fromarray(F32).save(path)
        return np.array([[round(float(v) * 255) for v in row] for row in F32])[None], True
    if kind == "LA PNG":
        grey = V16.astype(np.int64) * 255 // 65535
        Image.fromarray(np.dstack([grey, ALPHA]).astype(np.uint8), "LA").save(path)
        return over_black(grey[None], ALPHA), True
    if kind == "RGBA PNG":
        rgb = rgb_pattern(4, 4, 11)  # (H, W, 3); alpha 0 over non-black colours: they must come out black
        Image.fromarray(np.dstack([rgb, ALPHA]), "RGBA").save(path)
        return over_black(rgb.transpose(2, 0, 1), ALPHA), False
    if kind.startswith("P PNG"):
        image = Image.fromarray(INDICES, "P")
        image.putpalette(PALETTE.flatten().tolist())
        rgb = PALETTE[INDICES].transpose(2, 0, 1)  # (3, H, W)
        if kind == "P PNG":
            image.save(path)
            return rgb, False
        per_index = np.array([0, 128, 255, 40], np.uint8)  # a tRNS chunk: one alpha per palette entry
        image.save(path, transparency=per_index.tobytes())
        return over_black(rgb, per_index[INDICES]), False
    if kind == "CMYK JPEG":
        cmyk = np.array([10, 200, 30, 40], np.uint8)
        Image.new("CMYK", (16, 16), tuple(cmyk.tolist())).save(path, quality=100)
        c, k = cmyk[:3].astype(np.float64), float(cmyk[3])
        rgb = np.rint((255 - c) * (255 - k) / 255).astype(np.int64)  # PIL's CMYK -> RGB
        return np.broadcast_to(rgb[:, None, None], (3, 16, 16)), False
    raise AssertionError(kind)


KINDS = ["I;16 PNG", "I;16B TIFF", "I TIFF", "F TIFF", "LA PNG", "RGBA PNG", "P PNG", "P PNG transparent",
         "CMYK JPEG"]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_every_mode_converts_to_the_configured_channels(kind, channels, tmp_path):
    """16/32-bit scaled (not clipped), floats in [0, 1] scaled by 255, transparency composited on black."""
    suffix = {"PNG": ".png", "TIFF": ".tif", "JPEG": ".jpg"}[kind.split()[1]]
    expected, grey = write_kind(kind, tmp_path / f"a{suffix}")
    (tmp_path / f"b{suffix}").write_bytes((tmp_path / f"a{suffix}").read_bytes())
    size = expected.shape[-1]
    got = load_all(tmp_path, channels, size).numpy().astype(np.int64)  # (2, C, size, size)
    if grey:
        want = grey_to(expected[0], channels)
    else:
        want = expected if channels == 3 else luma(expected)
    tolerance = 2 if kind == "CMYK JPEG" else (1 if channels == 1 and not grey else 0)  # JPEG; PIL's fixed-point luma
    assert got.shape == (2, channels, size, size)
    for image in got:
        assert np.abs(image - want).max() <= tolerance, (kind, image, want)
    if kind.startswith("I") and channels == 1:  # not PIL's clipping (which makes 257..65535 all 255)
        assert (got[0, 0] < 255).sum() == 14


# --- images that cannot be used: found by the scan, named in one line -----------------------------------
def scan_error(root: Path, **kwargs) -> str:
    with pytest.raises(UserError) as err:
        build(ImageFolderDataConfig, root=str(root), batch_size=1, image_size=4, **kwargs).setup("fit")
    message = str(err.value)
    assert "\n" not in message
    return message


def fill_folder(root: Path, n: int = 3) -> None:
    root.mkdir(exist_ok=True)
    for i in range(n):
        Image.fromarray(rgb_pattern(4, 4, i)).save(root / f"ok{i}.png")


@pytest.mark.parametrize("size, over", [((10_000, 9_000), "warned"), ((20_000, 10_000), "refused")])
def test_decompression_bombs_are_named_with_the_limit_and_how_to_raise_it(size, over, tmp_path):
    """PIL's default limit, 89,478,485 pixels: PIL itself only warns up to twice that, refuses beyond."""
    fill_folder(tmp_path)
    Image.new("1", size).save(tmp_path / "bomb.png")  # 1-bit zeros: a few kB on disk
    pixels = size[0] * size[1]
    message = scan_error(tmp_path)
    assert f"first {tmp_path / 'bomb.png'}: {size[0]}x{size[1]} = {pixels:,} pixels" in message
    assert MESSAGES["data=image_folder, an image of 200,000,000 pixels (a decompression bomb)"] in message
    assert f"set data.max_image_pixels={pixels} (null: no limit)" in message


def test_the_pixel_limit_is_configurable(tmp_path):
    fill_folder(tmp_path)
    Image.fromarray(rgb_pattern(6, 6, 9)).save(tmp_path / "big.png")  # 36 pixels
    assert "6x6 = 36 pixels, more than data.max_image_pixels=35" in scan_error(tmp_path, max_image_pixels=35)
    for limit in (36, None):  # the user trusts the file
        data = build(ImageFolderDataConfig, root=str(tmp_path), batch_size=1, image_size=4, max_image_pixels=limit)
        assert len(data.reference_images("train", 10)) + len(data.reference_images("val", 10)) == 4
    with pytest.raises(UserError, match=MESSAGES["data=image_folder data.max_image_pixels=0"]):  # the config's rule
        validate(train_cfg(tmp_path, "data=image_folder", f"data.root={tmp_path}", "data.max_image_pixels=0"))


@pytest.mark.parametrize("case", ["data=image_folder, a float TIFF with values in [0, 255]",
                                  "data=image_folder, a 32-bit integer TIFF with values above 65535"])
def test_out_of_range_wide_images_are_named_before_training(case, tmp_path):
    fill_folder(tmp_path)
    values = np.linspace(0, 255, 16, dtype=np.float32) if "float" in case else np.arange(16, dtype=np.int32) * 5000
    Image.fromarray(values.reshape(4, 4)).save(tmp_path / "wide.tif")
    message = scan_error(tmp_path)
    assert f"first {tmp_path / 'wide.tif'}: " in message and MESSAGES[case] in message
    assert "save it as an 8- or 16-bit image" in message


# --- CIFAR-10 and MNIST files that are damaged or of another kind ------------------------------------------
def cifar_root(tmp_path: Path) -> Path:
    write_cifar(tmp_path, np.stack([cifar_pattern(i) for i in range(26)]), n_test=6)
    return tmp_path / "cifar-10-batches-py"


def setup_error(data) -> str:
    data.prepare_data()
    with pytest.raises(UserError) as err:
        data.setup("fit")
    message = str(err.value)
    assert "\n" not in message and "data.download=true" in message
    return message


@pytest.mark.parametrize("damage", ["truncated", "garbled", "list", "meta", "float data", "short rows", "empty"])
def test_damaged_cifar10_batches_are_named(damage, tmp_path):
    folder = cifar_root(tmp_path)
    batch = folder / "data_batch_3"
    raw = batch.read_bytes()
    if damage == "truncated":
        batch.write_bytes(raw[: len(raw) * 2 // 3])
    elif damage == "garbled":
        batch.write_bytes(raw[:2] + bytes(range(200, 240)) + raw[42:])
    elif damage == "list":
        write_py2_pickle(batch, [1, 2, 3])
    elif damage == "meta":
        batch.write_bytes((folder / "batches.meta").read_bytes())
    elif damage == "float data":
        write_py2_pickle(batch, {"data": np.zeros((4, 3072)), "labels": [0] * 4})
    elif damage == "short rows":  # 32x32 grey images, say
        write_py2_pickle(batch, {"data": np.zeros((4, 1024), np.uint8), "labels": [0] * 4})
    else:
        batch.write_bytes(b"")
    message = setup_error(build(CIFAR10DataConfig, root=str(tmp_path), batch_size=4))
    assert str(batch) in message, message
    fragment = "is truncated or corrupt" if damage in ("truncated", "garbled", "empty") else "is not a CIFAR-10 batch"
    assert fragment in message
    if damage in ("float data", "short rows"):
        shape = "float64 and shape (4, 3072)" if damage == "float data" else "uint8 and shape (4, 1024)"
        assert f"'data' of dtype {shape}" in message


@pytest.mark.parametrize("damage", ["truncated images", "labels as images", "truncated labels", "header only",
                                    "tiny"])
def test_damaged_mnist_files_are_named(damage, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    rng = np.random.default_rng(0)
    write_idx(raw, "train", rng.integers(0, 256, (10, 28, 28), dtype=np.uint8))
    write_idx(raw, "t10k", rng.integers(0, 256, (3, 28, 28), dtype=np.uint8))
    images, labels = raw / "train-images-idx3-ubyte", raw / "train-labels-idx1-ubyte"
    target = labels if damage == "truncated labels" else images
    if damage == "truncated images":
        images.write_bytes(images.read_bytes()[:-100])
    elif damage == "labels as images":
        images.write_bytes(labels.read_bytes())
    elif damage == "truncated labels":
        labels.write_bytes(labels.read_bytes()[:-1])
    elif damage == "header only":
        images.write_bytes(struct.pack(">III", 0x803, 10, 28))
    else:
        images.write_bytes(b"\x00\x00")
    message = setup_error(build(MNISTDataConfig, root=str(tmp_path), batch_size=4))
    assert str(target) in message, message
    if damage == "labels as images":
        assert "starts with the magic number 0x00000801, " + MESSAGES["data=mnist, an idx file with the wrong magic "
                                                                      "number"] in message
    elif damage == "truncated images":
        assert f"has {16 + 10 * 784 - 100:,} bytes, but its header announces (10, 28, 28) values" in message
    else:
        assert "is truncated" in message


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path):
    """A local web server over tmp_path/www (the downloads' source): yields its base URL."""
    www = tmp_path / "www"
    www.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(www)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


@pytest.mark.parametrize("source", ["unreachable", "damaged archive"])
def test_failed_cifar10_download_is_one_line(source, http_root, tmp_path, monkeypatch):
    """torchvision's own download code, against a closed port (no network) or a server whose archive is cut."""
    www, base = http_root
    if source == "damaged archive":
        (www / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b\x08\x00" + bytes(1000))
        monkeypatch.setattr(datasets.CIFAR10, "url", f"{base}/cifar-10-python.tar.gz")
    else:
        monkeypatch.setattr(datasets.CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    root = tmp_path / "data"
    with pytest.raises(UserError) as err:
        build(CIFAR10DataConfig, root=str(root), batch_size=4, download=True).prepare_data()
    message = str(err.value)
    assert "\n" not in message
    assert MESSAGES["data=cifar10 data.download=true, no network or a damaged archive"] in message
    assert str(root) in message and ("Connection refused" if source == "unreachable" else "corrupted") in message


# --- through train.py: one line, exit 2, before the first step ---------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("fault", ["bomb", "cifar"])
def test_data_faults_stop_train_py_before_the_first_step(fault, tmp_path):
    if fault == "bomb":
        fill_folder(tmp_path / "images", 4)
        Image.new("1", (20_000, 10_000)).save(tmp_path / "images" / "bomb.png")
        data = ["data=image_folder", f"data.root={tmp_path / 'images'}", "model=small32", "data.image_size=8",
                "data.batch_size=2", "data.num_workers=0"]
    else:
        batch = cifar_root(tmp_path / "cifar") / "data_batch_3"
        batch.write_bytes(batch.read_bytes()[:1000])
        data = ["data=cifar10", f"data.root={tmp_path / 'cifar'}", "model=small32", "data.batch_size=2"]
    run_dir = tmp_path / "run"
    result = run_script("train.py", "debug=fast", "logger=none", *data, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in result.stderr
    assert ("bomb.png: 20000x10000" if fault == "bomb" else f"{batch} is truncated or corrupt") in last
    assert not (run_dir / "checkpoints").exists()


def test_pickles_of_other_objects_are_not_batches(tmp_path):
    """A pickle of a foreign class (a torch tensor) is reported as what it holds."""
    folder = cifar_root(tmp_path)
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump(torch.zeros(2), f)
    message = setup_error(build(CIFAR10DataConfig, root=str(tmp_path), batch_size=4))
    assert f"{folder / 'data_batch_2'} is not a CIFAR-10 batch: it holds a Tensor" in message
