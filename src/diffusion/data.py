"""LightningDataModules: scikit-learn digits (the default), MNIST, Fashion-MNIST, CIFAR-10, a folder of images.

Every split is first a dataset of uint8 (C, H, W) images; the loaders turn them into float32 (B, C, H, W)
batches as x_uint8 / 127.5 - 1, so values lie exactly on the 256-level grid in [-1, 1] that the paper's
discretized decoder assumes (Ho et al. 2020, Sec. 3.3). Labels are dropped. Nothing is downloaded unless
``download=True``; missing or empty data raise a one-line ``UserError`` before training starts.

The train order and the flips are a function of (seed, epoch) alone (`EpochSampler`), and the train loader
tells Lightning how far into the epoch it got (`ResumableLoader`), so a run resumed from a checkpoint taken in
the middle of an epoch sees exactly the batches the uninterrupted run would have seen.
"""

from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision import datasets
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms.v2.functional import pil_to_tensor

from diffusion.errors import UserError

SPLITS = ("train", "val")
SPLIT_SEED = 0  # held-out splits are fixed, independent of the training seed
_NOT_FOUND = "set data.download=true to fetch it, or data.root=PATH to point at an existing copy"


def to_model_range(images: Tensor) -> Tensor:
    """uint8 images -> float32 on the 256-level grid in [-1, 1]: x / 127.5 - 1, correctly rounded."""
    return (images.to(torch.float32) * 2 - 255) / 255  # exact integers, then a single rounding


def require_files(name: str, root: Path, relpaths: list[str]) -> None:
    """Raise the one-line 'not found' UserError unless every file exists under root."""
    for relpath in relpaths:
        if not (root / relpath).is_file():
            raise UserError(f"{name} not found under {root.resolve()} (expected {relpath}); {_NOT_FOUND}")


class _Images(Dataset):
    """An in-memory uint8 tensor (N, C, H, W), one image per item."""

    def __init__(self, images: Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tensor:
        return self.images[index]


class _ModelInputs(Dataset):
    """uint8 (C, H, W) images -> float32 in [-1, 1], by index or by (index, flip) as `EpochSampler` draws them."""

    def __init__(self, images: Dataset):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, bool]) -> Tensor:
        index, flip = key if isinstance(key, tuple) else (key, False)
        x = self.images[index]  # (C, H, W) uint8
        return to_model_range(x.flip(-1) if flip else x)


class EpochSampler(DistributedSampler):
    """This rank's share of a permutation drawn from (seed, epoch) alone, as (index, flip) pairs.

    The flips (probability 1/2 each, if asked) come from the same draw, so they do not depend on which
    process loads the image or on any global RNG. `start` skips this rank's first draws (a resumed epoch).
    Ranks take every num_replicas-th draw; being a DistributedSampler, Lightning does not wrap it under DDP.
    """

    def __init__(self, dataset: Dataset, seed: int, random_flip: bool, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.random_flip, self.start = random_flip, 0

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        n = len(self.dataset)
        order, flips = rng.permutation(n), (rng.random(n) < 0.5) & self.random_flip  # (N,), (N,)
        mine = slice(self.rank + self.start * self.num_replicas, self.total_size, self.num_replicas)
        return zip(order[mine].tolist(), flips[mine].tolist(), strict=True)


class ResumableLoader(DataLoader):
    """The train loader: Lightning saves its `state_dict` (epoch, batches served) in every checkpoint and
    loads it on resume (its fit loop does so for any loader with state_dict/load_state_dict), so the resumed
    epoch goes on with the batches the uninterrupted run would have drawn. Its sampler is an `EpochSampler`.

    Batches are counted as they leave the loader, so workers fetching ahead do not shift the position.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._epoch, self._served, self._resuming = 0, 0, False  # the pass under way: its epoch, batches given

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, served = state["epoch"], state["batches"]
        if served >= len(self):  # saved after the epoch's last batch: the next epoch starts from its beginning
            epoch, served = epoch + 1, 0
        self._epoch, self._served, self._resuming = epoch, served, True
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        return self._batches()  # a generator: nothing is drawn before the first batch is asked for

    def _batches(self):
        if self._resuming:  # the restored position wins over the epoch Lightning set meanwhile
            self.sampler.set_epoch(self._epoch)
        else:
            self._epoch, self._served = self.sampler.epoch, 0
        self._resuming = False
        self.sampler.start = self._served * self.batch_size
        for batch in super().__iter__():
            self._served += 1
            yield batch
        self.sampler.set_epoch(self._epoch + 1)  # a whole pass (outside Lightning, which sets it): a new order


class ImageDataModule(L.LightningDataModule):
    """Shared loaders over uint8 splits; subclasses say where the images come from (`_load_split`)."""

    name = "images"

    def __init__(self, root: str, batch_size: int, num_workers: int, download: bool, seed: int,
                 random_flip: bool, *, channels: int, image_size: int):
        super().__init__()
        if batch_size < 1:
            raise UserError(f"data.batch_size must be >= 1, got {batch_size}; try data.batch_size=128")
        if num_workers < 0:
            raise UserError(f"data.num_workers must be >= 0, got {num_workers}; try data.num_workers=0")
        if seed < 0:
            raise UserError(f"data.seed must be >= 0, got {seed}; try data.seed=0")
        self.root, self.batch_size, self.num_workers = Path(root).expanduser(), batch_size, num_workers
        self.download, self.seed, self.random_flip = download, seed, random_flip
        self.channels, self.image_size = channels, image_size
        self._splits: dict[str, Dataset] = {}

    def _load_split(self, split: str) -> Dataset:
        """The split's images as a dataset of uint8 (C, H, W) tensors."""
        raise NotImplementedError

    def _fetch(self) -> None:
        """Download the dataset into root (only called with download=True)."""

    def _where(self) -> str:
        return f"under {self.root.resolve()}"

    def prepare_data(self) -> None:
        if self.download:
            self._fetch()

    def setup(self, stage: str | None = None) -> None:
        for split in SPLITS:
            self._split(split)

    def _split(self, split: str) -> Dataset:
        """The split's uint8 images, loaded once; train must hold a full batch, val at least one image."""
        if split not in SPLITS:
            raise UserError(f"split must be one of {SPLITS}, got {split!r}; use 'train' or 'val'")
        if split not in self._splits:
            images = self._load_split(split)
            if split == "train" and len(images) < self.batch_size:
                raise UserError(
                    f"{self.name} train split {self._where()} has {len(images)} images, fewer than one batch "
                    f"(data.batch_size={self.batch_size}); add images or lower data.batch_size")
            if len(images) == 0:
                raise UserError(f"{self.name} {split} split {self._where()} has 0 images; add images to it")
            self._splits[split] = images
        return self._splits[split]

    def train_dataloader(self) -> ResumableLoader:
        """Shuffled and flipped as (seed, epoch) say, this rank's share under DDP, last partial batch dropped."""
        trainer = self.trainer
        dataset = _ModelInputs(self._split("train"))
        sampler = EpochSampler(dataset, self.seed, self.random_flip, num_replicas=trainer.world_size if trainer else 1,
                               rank=trainer.global_rank if trainer else 0)
        return ResumableLoader(dataset, sampler=sampler, drop_last=True, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_ModelInputs(self._split("val")), **self._loader_kwargs())

    def _loader_kwargs(self) -> dict:
        # Each loader has its own generator, so starting an epoch never draws from the global RNG,
        # which is the training noise's (DataLoader draws its workers' base seed from it otherwise).
        return {"batch_size": self.batch_size, "num_workers": self.num_workers, "generator": torch.Generator(),
                "persistent_workers": self.num_workers > 0, "pin_memory": torch.cuda.is_available()}

    def reference_images(self, split: str, max_images: int) -> Tensor:
        """The first `max_images` un-augmented images of `split` as uint8 (N, C, H, W), e.g. for FID."""
        if max_images < 1:
            raise UserError(f"max_images must be >= 1, got {max_images}; ask for at least one image")
        images = self._split(split)
        subset = Subset(images, range(min(len(images), max_images)))
        return torch.cat(list(DataLoader(subset, batch_size=256, num_workers=self.num_workers,
                                         generator=torch.Generator())))  # leaves the global RNG alone


class DigitsDataModule(ImageDataModule):
    """scikit-learn's 1,797 bundled 8x8 grey digits (never downloaded): 0..16 -> round(x * 255 / 16).

    The val split (`val_size` images, stratified by digit) is fixed by SPLIT_SEED, whatever the training
    seed. Nothing is read from disk or downloaded. No flips: a mirrored digit is another symbol.
    """

    name = "digits"

    def __init__(self, batch_size: int = 128, num_workers: int = 0, seed: int = 0, random_flip: bool = False,
                 val_size: int = 297):
        super().__init__("", batch_size, num_workers, False, seed, random_flip, channels=1, image_size=8)
        if random_flip:
            raise UserError("data.random_flip=true would mirror digits into other symbols; set data.random_flip=false")
        if not 1 <= val_size < 1797:
            raise UserError(f"data.val_size must be in [1, 1796] for the 1,797 digits, got {val_size}; try 297")
        self.val_size = val_size

    def _where(self) -> str:
        return "in scikit-learn's load_digits"

    def _load_split(self, split: str) -> Dataset:
        digits = load_digits()
        images = np.rint(digits.images * 255 / 16).astype(np.uint8)  # (1797, 8, 8)
        train_idx, val_idx = train_test_split(np.arange(len(images)), test_size=self.val_size,
                                              stratify=digits.target, random_state=SPLIT_SEED)
        index = np.sort(train_idx if split == "train" else val_idx)
        return _Images(torch.from_numpy(images[index]).unsqueeze(1))  # (N, 1, 8, 8)


class MNISTDataModule(ImageDataModule):
    """MNIST through torchvision (root/MNIST/raw/*-ubyte): train = the 60k train set, val = the 10k test set.

    The 28x28 digits are padded with `(image_size - 28) / 2` pixels of background (0) on each side rather
    than resized, so pixel values stay exactly as stored; the default 32 lets the U-Net halve it 3 times.
    """

    name = "MNIST"
    dataset_class = datasets.MNIST

    def __init__(self, root: str, batch_size: int, num_workers: int = 0, download: bool = False,
                 seed: int = 0, random_flip: bool = False, image_size: int = 32):
        super().__init__(root, batch_size, num_workers, download, seed, random_flip,
                         channels=1, image_size=image_size)
        if image_size < 28:
            raise UserError(f"data.image_size must be >= 28 for {self.name} (it pads the 28x28 images with "
                            f"background), got {image_size}; try data.image_size=32")

    def _fetch(self) -> None:
        for train in (True, False):
            self.dataset_class(self.root, train=train, download=True)

    def _load_split(self, split: str) -> Dataset:
        prefix = "train" if split == "train" else "t10k"
        raw = f"{self.dataset_class.__name__}/raw"
        require_files(self.name, self.root, [f"{raw}/{prefix}-images-idx3-ubyte", f"{raw}/{prefix}-labels-idx1-ubyte"])
        images = self.dataset_class(self.root, train=split == "train").data.unsqueeze(1)  # (N, 1, 28, 28)
        before = (self.image_size - 28) // 2
        after = self.image_size - 28 - before
        return _Images(torch.nn.functional.pad(images, (before, after, before, after), value=0))


class FashionMNISTDataModule(MNISTDataModule):
    """Fashion-MNIST (root/FashionMNIST/raw/*-ubyte), laid out and padded exactly like MNIST."""

    name = "Fashion-MNIST"
    dataset_class = datasets.FashionMNIST


class _CIFAR10Files(datasets.CIFAR10):
    """torchvision's CIFAR10 reader, checking that the batch files exist but not their md5 sums.

    torchvision compares every file with the md5 of the official release, which rejects any other correctly
    formatted file (such as the tiny ones the tests write). Downloads go through torchvision's own CIFAR10,
    which checks the archive and the files.
    """

    train_list = [[name, None] for name, _ in datasets.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in datasets.CIFAR10.test_list]
    meta = {**datasets.CIFAR10.meta, "md5": None}


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 (root/cifar-10-batches-py/): train = data_batch_1..5 (50k), val = test_batch (10k), 32x32x3.

    Random horizontal flips on train are the paper's only augmentation (Ho et al. 2020, Appendix B).
    """

    name = "CIFAR-10"

    def __init__(self, root: str, batch_size: int, num_workers: int = 0, download: bool = False,
                 seed: int = 0, random_flip: bool = True):
        super().__init__(root, batch_size, num_workers, download, seed, random_flip, channels=3, image_size=32)

    def _fetch(self) -> None:
        for train in (True, False):
            datasets.CIFAR10(self.root, train=train, download=True)

    def _load_split(self, split: str) -> Dataset:
        files = _CIFAR10Files.train_list if split == "train" else _CIFAR10Files.test_list
        names = [name for name, _ in files] + [_CIFAR10Files.meta["filename"]]
        require_files(self.name, self.root, [f"{_CIFAR10Files.base_folder}/{name}" for name in names])
        images = _CIFAR10Files(self.root, train=split == "train").data  # (N, 32, 32, 3) uint8
        return _Images(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())  # (N, 3, 32, 32)


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
