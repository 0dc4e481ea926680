"""A folder of image files: scanning, checking every file before training, loading them square."""

from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms.v2.functional import pil_to_tensor

from diffusion.data.base import SPLIT_SEED, ImageDataModule
from diffusion.errors import UserError


def find_images(root: Path) -> list[Path]:
    """Every image file under root, recursively and sorted, skipping hidden files and folders."""
    return sorted(
        path for path in root.rglob("*")
        if path.suffix.lower() in IMG_EXTENSIONS and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(root).parts))


def image_problem(path: Path) -> str | None:
    """Why `path` is not a readable image, or None: PNGs by their checksums, others by a draft decode."""
    try:
        with Image.open(path) as image:
            if image.format == "PNG":
                image.verify()  # reads every chunk, checks its CRC: finds truncation
            else:
                image.draft(None, (1, 1))  # JPEG: decode at 1/8 scale, still reads all the data
                image.load()
    except (OSError, SyntaxError, ValueError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def load_square(path: Path, mode: str, size: int) -> Tensor:
    """One image file -> uint8 (C, size, size): converted to `mode`, center-cropped square, resized."""
    try:
        with Image.open(path) as image:
            image = image.convert(mode)
    except OSError as err:
        raise UserError(f"cannot read image {path} ({err}); remove it or replace it with a valid file") from err
    width, height = image.size
    side = min(width, height)
    box = ((width - side) // 2, (height - side) // 2, (width - side) // 2 + side, (height - side) // 2 + side)
    return pil_to_tensor(image.resize((size, size), Image.Resampling.BICUBIC, box=box))


class _ImageFiles(Dataset):
    """Image files loaded on demand as uint8 (C, size, size)."""

    def __init__(self, paths: list[Path], mode: str, size: int):
        self.paths, self.mode, self.size = paths, mode, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor:
        return load_square(self.paths[index], self.mode, self.size)


class ImageFolderDataModule(ImageDataModule):
    """Any folder of images (searched recursively; subfolders optional, labels ignored).

    Each image is converted to RGB (channels=3) or L (channels=1), center-cropped to a square and resized
    to `image_size` (bicubic). A fixed share `val_fraction` of the files (chosen with SPLIT_SEED, whatever
    the training seed) is held out for val. Unreadable files are reported before training starts.
    """

    name = "image folder"

    def __init__(self, root: str, batch_size: int, num_workers: int = 0, download: bool = False,
                 seed: int = 0, random_flip: bool = False, image_size: int = 64, channels: int = 3,
                 val_fraction: float = 0.05):
        super().__init__(root, batch_size, num_workers, download, seed, random_flip,
                         channels=channels, image_size=image_size)
        if download:
            raise UserError("data.download=true: an image folder cannot be downloaded; set data.download=false")
        if channels not in (1, 3):
            raise UserError(f"data.channels must be 1 (grey) or 3 (RGB), got {channels}; try data.channels=3")
        if image_size < 1:
            raise UserError(f"data.image_size must be >= 1, got {image_size}; try data.image_size=64")
        if not 0 < val_fraction < 1:
            raise UserError(f"data.val_fraction must be in (0, 1), got {val_fraction}; try data.val_fraction=0.05")
        self.val_fraction = val_fraction

    @cached_property
    def _files(self) -> dict[str, list[Path]]:
        """All readable image files, split into train and val by a fixed permutation."""
        paths = self._scan()
        n_val = max(1, round(len(paths) * self.val_fraction))
        order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
        return {"val": sorted(paths[i] for i in order[:n_val]), "train": sorted(paths[i] for i in order[n_val:])}

    def _scan(self) -> list[Path]:
        """The folder's image files, after checking that there are some and that all can be read."""
        root = self.root.resolve()
        if not root.is_dir():
            raise UserError(f"image folder {root} does not exist; set data.root=PATH to a folder of images")
        paths = find_images(root)
        if not paths:
            raise UserError(f"image folder {root} has 0 images ({', '.join(IMG_EXTENSIONS)}); "
                            "set data.root=PATH to a folder of images")
        with ThreadPoolExecutor(max(1, self.num_workers)) as pool:
            problems = list(pool.map(image_problem, paths))
        bad = [(path, why) for path, why in zip(paths, problems, strict=True) if why]
        if bad:
            raise UserError(f"{len(bad)} of {len(paths)} files in {root} are unreadable images, first "
                            f"{bad[0][0]} ({bad[0][1]}); remove them (or repair them) and run again")
        return paths

    def _load_split(self, split: str) -> Dataset:
        return _ImageFiles(self._files[split], "RGB" if self.channels == 3 else "L", self.image_size)
