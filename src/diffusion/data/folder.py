"""A folder of image files: scanning, checking every file before training, loading them square.

Every file becomes 8-bit L (data.channels=1) or RGB (data.channels=3), whatever it stores:
- 16-bit grey (PIL modes I;16, I;16B, I;16L, I;16N) and 32-bit integer grey (I, which must hold values in
  [0, 65535]: PIL reads some 16-bit files so) are scaled by 255/65535 and rounded; PIL's own conversion
  clips them at 255, which turns nearly every pixel white;
- 32-bit float grey (F) must lie in [0, 1]; it is scaled by 255 and rounded (PIL's own clips at 1);
- transparency (LA, PA, RGBA, a palette or L/RGB image with a transparent color) is composited on black:
  each channel becomes round(c · alpha / 255), so a fully transparent pixel is black whatever color it stores;
- palette images take their palette's colors, CMYK becomes RGB as PIL converts it (R = (255-C)(255-K)/255),
  and colour becomes grey by PIL's ITU-R 601-2 luma (L = 0.299 R + 0.587 G + 0.114 B).
Files that cannot be read, that hold more than data.max_image_pixels pixels (PIL's guard against
decompression bombs, 89,478,485 by default) or whose values do not fit the ranges above are found by the
scan before training, and named in one line.
"""

import hashlib
import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms.v2.functional import pil_to_tensor

from diffusion.data.base import SPLIT_SEED, SPLITS, ImageDataModule
from diffusion.errors import UserError

PIL_MAX_PIXELS = 89_478_485  # PIL's default Image.MAX_IMAGE_PIXELS
_WIDE_INTEGER = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": 65535}  # mode -> white
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")


class PixelRangeError(ValueError):
    """A 16/32-bit or float image whose values lie outside the range that maps onto [0, 255]."""


def find_images(root: Path) -> list[Path]:
    """Every image file under root, recursively and sorted, skipping hidden files and folders."""
    return sorted(
        path for path in root.rglob("*")
        if path.suffix.lower() in IMG_EXTENSIONS and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(root).parts))


def to_8bit(image: Image.Image) -> Image.Image:
    """A 16/32-bit integer or float grey image -> 8-bit L, scaled to [0, 255] and rounded; others unchanged.

    Raises PixelRangeError (saying what to do) for values outside [0, 65535] (integers) or [0, 1] (floats).
    """
    if image.mode != "F" and image.mode not in _WIDE_INTEGER:
        return image
    x = np.asarray(image).astype(np.float64)  # (H, W)
    white = 1.0 if image.mode == "F" else _WIDE_INTEGER[image.mode]
    if not np.isfinite(x).all() or x.min() < 0 or x.max() > white:
        kind = "32-bit float" if image.mode == "F" else f"{image.mode} integer"
        raise PixelRangeError(f"{kind} values in [{x.min():g}, {x.max():g}], outside [0, {white:g}]; save it as an "
                         "8- or 16-bit image, or as floats in [0, 1]")
    return Image.fromarray(np.rint(x * 255 / white).astype(np.uint8), "L")


def to_channels(image: Image.Image, mode: str) -> Image.Image:
    """Any PIL image -> 8-bit `mode` ("L" or "RGB"), as the module docstring says (alpha over black)."""
    image = to_8bit(image)
    if image.mode in ("La", "LAB"):  # modes PIL cannot convert to every other
        image = image.convert("LA" if image.mode == "La" else "RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.uint32)  # (H, W, 4)
        rgb = (rgba[..., :3] * rgba[..., 3:] + 127) // 255  # round(c * alpha / 255): composited on black
        image = Image.fromarray(rgb.astype(np.uint8), "RGB")
    return image.convert(mode)


def open_image(source: Path | bytes) -> Image.Image:
    """PIL's image of a file, or of an encoded image held in memory (a database record)."""
    return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)


def image_problem(source: Path | bytes, max_pixels: int | None = PIL_MAX_PIXELS,
                  repair: str = "remove such files or repair them") -> str | None:
    """Why `source` (a file, or an encoded image's bytes) cannot be used, with the fix, or None: its size against
    `max_pixels` (None: no limit), PNGs by their checksums, others by a draft decode, 16/32-bit grey by their
    values. `repair` is the fix for an image that cannot be decoded."""
    try:
        with open_image(source) as image:
            width, height, mode = image.width, image.height, image.mode
            if max_pixels is not None and width * height > max_pixels:
                return (f"{width}x{height} = {width * height:,} pixels, more than data.max_image_pixels={max_pixels}"
                        f" (PIL's guard against decompression bombs); if you trust the file, set "
                        f"data.max_image_pixels={width * height} (null: no limit), else remove it")
            if image.format == "PNG":
                image.verify()  # reads every chunk, checks its CRC: finds truncation
            else:
                image.draft(None, (1, 1))  # JPEG: decode at 1/8 scale, still reads all the data
                image.load()
        if mode == "F" or mode in _WIDE_INTEGER:
            with open_image(source) as image:
                to_8bit(image)  # their values must fit the 8-bit range
    except PixelRangeError as err:
        return str(err)
    except Image.DecompressionBombError as err:  # PIL's own guard, where the caller left it on
        return f"{err}; if you trust the file, raise data.max_image_pixels (null: no limit), else remove it"
    except (OSError, SyntaxError, ValueError) as err:
        return f"unreadable ({type(err).__name__}: {err}); {repair}"
    return None


def image_problems(sources: Sequence[Path | bytes], max_pixels: int | None, workers: int,
                   repair: str = "remove such files or repair them") -> list[str | None]:
    """`image_problem` of each source, on `workers` threads; then PIL's own guard is `max_pixels`, for loading."""
    Image.MAX_IMAGE_PIXELS = None  # the scan compares sizes itself, and says how to raise the limit
    try:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            return list(pool.map(lambda source: image_problem(source, max_pixels, repair), sources))
    finally:
        Image.MAX_IMAGE_PIXELS = max_pixels  # PIL's own guard while loading, as configured


def load_square(source: Path | bytes, mode: str, size: int, max_pixels: int | None = PIL_MAX_PIXELS,
                name: str | None = None) -> Tensor:
    """One image (a file, or an encoded image's bytes called `name`) -> uint8 (C, size, size): converted to `mode`,
    center-cropped square, resized."""
    Image.MAX_IMAGE_PIXELS = max_pixels  # the scan allowed this image; also in a freshly spawned worker
    try:
        with open_image(source) as image:
            image = to_channels(image, mode)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"cannot read image {name or source} ({err}); remove it or replace it with a valid "
                        "one") from err
    width, height = image.size
    side = min(width, height)
    box = ((width - side) // 2, (height - side) // 2, (width - side) // 2 + side, (height - side) // 2 + side)
    return pil_to_tensor(image.resize((size, size), Image.Resampling.BICUBIC, box=box))


class _ImageFiles(Dataset):
    """Image files loaded on demand as uint8 (C, size, size)."""

    def __init__(self, paths: list[Path], mode: str, size: int, max_pixels: int | None):
        self.paths, self.mode, self.size, self.max_pixels = paths, mode, size, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor:
        return load_square(self.paths[index], self.mode, self.size, self.max_pixels)


class ImageFolderDataModule(ImageDataModule):
    """Any folder of images (searched recursively). Its classes are its top-level subfolders, sorted by name
    (`root/<class>/.../x.png`); only a class-conditional model asks for them, and then every image must lie
    in one.

    Each image is converted to RGB (channels=3) or L (channels=1) as the module docstring says,
    center-cropped to a square and resized to `image_size` (bicubic). A fixed share `val_fraction` of the
    files (chosen with SPLIT_SEED, whatever the training seed) is held out for val. Unusable files
    (unreadable, over `max_image_pixels`, out-of-range values) are reported before training starts.
    """

    name = "image folder"

    def __init__(self, *, root: str, batch_size: int, num_workers: int, download: bool, seed: int,
                 random_flip: bool, image_size: int, channels: int, val_fraction: float,
                 max_image_pixels: int | None):
        """download is always false here (config/validation.py refuses true: a folder cannot be downloaded)."""
        super().__init__(root, batch_size, num_workers, download, seed, random_flip,
                         channels=channels, image_size=image_size, on_device=False)
        self.val_fraction, self.max_image_pixels = val_fraction, max_image_pixels

    @cached_property
    def _files(self) -> dict[str, list[Path]]:
        """All readable image files, split into train and val by a fixed permutation."""
        paths = self._scan()
        n_val = max(1, round(len(paths) * self.val_fraction))
        order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
        return {"val": sorted(paths[i] for i in order[:n_val]), "train": sorted(paths[i] for i in order[n_val:])}

    def _scan(self) -> list[Path]:
        """The folder's image files, after checking that there are some and that all can be used."""
        root = self.root.resolve()
        if not root.is_dir():
            raise UserError(f"image folder {root} does not exist; set data.root=PATH to a folder of images")
        paths = find_images(root)
        if not paths:
            raise UserError(f"image folder {root} has 0 images ({', '.join(IMG_EXTENSIONS)}); "
                            "set data.root=PATH to a folder of images")
        problems = image_problems(paths, self.max_image_pixels, self.num_workers)
        bad = [(path, why) for path, why in zip(paths, problems, strict=True) if why]
        if bad:
            raise UserError(f"{len(bad)} of {len(paths)} image files in {root} cannot be used, first "
                            f"{bad[0][0]}: {bad[0][1]}")
        return paths

    def _fingerprint(self) -> str:
        """sha256 of each split's files: their paths relative to the root, sorted, and their sizes in bytes (the
        images are not read again: the scan has read every one)."""
        digest = hashlib.sha256()
        root = self.root.resolve()
        for split in SPLITS:
            for path in self._files[split]:
                digest.update(f"{split} {path.relative_to(root).as_posix()} {path.stat().st_size}\n".encode())
        return digest.hexdigest()[:16]

    def _class_of(self, path: Path) -> str | None:
        parts = path.relative_to(self.root.resolve()).parts
        return parts[0] if len(parts) > 1 else None

    @cached_property
    def class_names(self) -> list[str]:
        """The top-level subfolders holding images, sorted: class k is the k-th of them."""
        paths = [*self._files["train"], *self._files["val"]]
        loose = [path for path in paths if self._class_of(path) is None]
        if loose:
            raise UserError(f"image folder {self.root.resolve()} has {len(loose)} images outside any class subfolder "
                            f"(first {loose[0].name}); a class-conditional model needs root/<class>/<image>: move "
                            "them into class folders, or train unconditionally (model.num_classes=null)")
        return sorted({self._class_of(path) for path in paths})

    def _load_labels(self, split: str) -> torch.Tensor:
        index = {name: k for k, name in enumerate(self.class_names)}
        return torch.tensor([index[self._class_of(path)] for path in self._files[split]], dtype=torch.long)

    def _load_split(self, split: str) -> Dataset:
        return _ImageFiles(self._files[split], "RGB" if self.channels == 3 else "L", self.image_size,
                           self.max_image_pixels)
