"""The DataModule every data set shares: uint8 splits, loaders, reference images, checks before training.

Every split is first a dataset of uint8 (C, H, W) images; the loaders turn them into float32 (B, C, H, W)
batches as x_uint8 / 127.5 - 1, so values lie exactly on the 256-level grid in [-1, 1] that the paper's
discretized decoder assumes (Ho et al. 2020, Sec. 3.3). Nothing is downloaded unless ``download=True``;
missing or empty data raise a one-line ``UserError`` before training starts.
"""

import hashlib
import tarfile
import zlib
from functools import cached_property
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from diffusion.data.loader import (
    DEVICE_SHARE,
    DeviceLoader,
    EpochSampler,
    ResumableLoader,
    _ModelInputs,
    free_memory,
    split_on_device,
)
from diffusion.errors import UserError

SPLITS = ("train", "val")
SPLIT_SEED = 0  # held-out splits are fixed, independent of the training seed
_NOT_FOUND = "set data.download=true to fetch it, or data.root=PATH to point at an existing copy"

def same_data(a: dict, b: dict) -> bool:
    """Whether two `identity` records are of the same data: the same data set, images and contents. The root may
    differ: a copy of the same files elsewhere (a node's local disk) is the same data."""
    return all(a.get(key) == b.get(key) for key in ("name", "size", "fingerprint"))


def describe_data(identity: dict) -> str:
    """An `identity` record in a few words: `digits (scikit-learn's load_digits, 1500+297 images, 3f2a...)`."""
    size = "+".join(str(n) for n in identity["size"].values())
    return f"{identity['name']} ({identity['root']}, {size} images, fingerprint {identity['fingerprint']})"


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


class ImageDataModule(L.LightningDataModule):
    """Shared loaders over uint8 splits; subclasses say where the images come from (`_load_split`).

    What evaluation asks of a data set is asked of its module: `quality_extractor` (the feature extractor
    that scores samples of it) and `eval_num_samples` (how many samples evaluate.py scores by default).

    Every data set has labels: `labels(split)` (int64 (N,) class indices) and `class_names` (index order).
    The loaders yield them beside the images, as (images, labels) batches, once `with_labels` is set (a
    class-conditional model's run sets it); otherwise batches are images alone, as before labels existed.
    """

    name = "images"
    quality_extractor = "inception"
    eval_num_samples = 1_000
    # the data.* keys whose value the data set itself fixes (digits: 1×8×8): the value is the schema's default, and
    # config/validation.py refuses another before anything is built
    fixed_shape: tuple[str, ...] = ()

    def __init__(self, root: str, batch_size: int, num_workers: int, download: bool, seed: int,
                 random_flip: bool, *, channels: int, image_size: int, on_device: bool | None):
        """The arguments are a validated config's (config/groups.py: their defaults and rules); taken as given."""
        super().__init__()
        self.root, self.batch_size, self.num_workers = Path(root).expanduser(), batch_size, num_workers
        self.download, self.seed, self.random_flip = download, seed, random_flip
        self.channels, self.image_size, self.on_device = channels, image_size, on_device
        self._splits: dict[str, Dataset] = {}
        self._labels: dict[str, Tensor] = {}
        self.with_labels = False

    def _load_split(self, split: str) -> Dataset:
        """The split's images as a dataset of uint8 (C, H, W) tensors."""
        raise NotImplementedError

    def _load_labels(self, split: str) -> Tensor:
        """The split's class indices as int64 (N,), in the order of `_load_split`'s images."""
        raise NotImplementedError

    @property
    def class_names(self) -> list[str]:
        """The names of the classes, in index order."""
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def labels(self, split: str) -> Tensor:
        """The split's labels (int64 (N,)), loaded once; one per image, each in [0, num_classes)."""
        if split not in self._labels:
            labels, n = self._load_labels(split), len(self._split(split))
            if len(labels) != n or (n and not 0 <= int(labels.min()) <= int(labels.max()) < self.num_classes):
                raise UserError(f"{self.name} {split} split {self._where()} has {len(labels)} labels for {n} images, "
                                f"or labels outside [0, {self.num_classes}); {_NOT_FOUND}")
            self._labels[split] = labels.long()
        return self._labels[split]

    def _inputs(self, split: str) -> Dataset:
        """The split as model inputs: images in [-1, 1], with their labels when `with_labels` is set."""
        return _ModelInputs(self._split(split), self.labels(split) if self.with_labels else None)

    @cached_property
    def identity(self) -> dict:
        """What this data is, for a checkpoint to record and a resume to compare: the data set's name, where it
        was read from, the images per split and a fingerprint of their contents (`same_data` says which count)."""
        return {"name": self.name, "root": self._source(), "size": {s: len(self._split(s)) for s in SPLITS},
                "fingerprint": self._fingerprint()}

    def _source(self) -> str:
        return str(self.root.resolve())

    def _fingerprint(self) -> str:
        """sha256 of every split's uint8 images (already in memory), shape and bytes."""
        digest = hashlib.sha256()
        for split in SPLITS:
            images = self._split(split).images.contiguous()  # (N, C, H, W) uint8
            digest.update(f"{split} {tuple(images.shape)}\n".encode())
            digest.update(images.numpy().tobytes())
        return digest.hexdigest()[:16]

    def _fetch(self) -> None:
        """Download the dataset into root (only called with download=True)."""

    def _where(self) -> str:
        return f"under {self.root.resolve()}"

    def prepare_data(self) -> None:
        """With download=True, fetch the data (torchvision checks each archive's md5 and fetches a damaged
        one again); a failed download or extraction is one line, before training starts."""
        if not self.download:
            return
        try:
            self._fetch()
        except (OSError, RuntimeError, EOFError, tarfile.TarError, zlib.error) as err:
            reason = " ".join(f"{type(err).__name__}: {err}".split())
            raise UserError(f"could not download {self.name} into {self.root.resolve()} ({reason}); check the "
                            "network and run again (a damaged archive there is fetched again), or put the extracted "
                            "files there yourself and set data.download=false") from err

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
        dataset = self._inputs("train")
        sampler = EpochSampler(dataset, self.seed, self.random_flip, num_replicas=trainer.world_size if trainer else 1,
                               rank=trainer.global_rank if trainer else 0)
        device = trainer.strategy.root_device if trainer else torch.device("cpu")
        if self._on_device(device):  # the same draws, gathered from a copy of the images on the training device
            return DeviceLoader(self._split("train").images, sampler, self.batch_size, device,
                                labels=self.labels("train") if self.with_labels else None)
        return ResumableLoader(dataset, sampler=sampler, drop_last=True, **self._loader_kwargs())

    def _on_device(self, device: torch.device) -> bool:
        """data.on_device's answer for this split and device (`split_on_device`), said once where it was asked."""
        if self.on_device is False:  # also every data set read from files as it goes (image folders)
            return False
        images = self._split("train").images  # (N, C, H, W) uint8
        nbytes = images.numel() * images.element_size()
        chosen = split_on_device(self.on_device, nbytes, device, free_memory(device))
        if self.on_device is None and device.type != "cpu":
            where = f"on {device}" if chosen else "read by the DataLoader"
            rank_zero_info(f"data: the {self.name} train split ({nbytes / 2**20:.0f} MiB) is {where} "
                           f"(data.on_device=null: on the device when it takes at most {DEVICE_SHARE:.0%} of the "
                           "free memory there)")
        return chosen

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._inputs("val"), **self._loader_kwargs())

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

