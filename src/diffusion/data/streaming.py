"""Shards written once and streamed from local disk or object storage: LitData's `optimize` and `StreamingDataset`.

`write_shards` writes any of our DataModules (digits, MNIST, CIFAR-10, an image folder, ...) as LitData chunks:
input_dir/train and input_dir/val, each item {"image": uint8 (C, H, W), "label": int (-1 where the source has no
classes)}, and input_dir/diffusion.json, what the shards hold (source, shape, class names, labels). The whole
folder is written beside its target and renamed at the end, so it is there whole or not at all.

`StreamingDataModule` trains from them (input_dir: a local folder or an s3:// URL, which LitData reads itself).
LitData gives each DDP rank and worker its share of the chunks, shuffles chunks and the items within them anew each
epoch from (seed, epoch), and its StreamingDataLoader's `state_dict` (epoch, samples served) is what Lightning
saves in every checkpoint and restores on resume: a resumed run sees the batches the uninterrupted run would have.
The order depends on (seed, epoch, world size, data.num_workers), so a resume keeps those (LitData checks them).
Batches are those of the other data sets: float32 x_uint8 / 127.5 - 1, flipped as (seed, epoch, index) say when
data.random_flip, with their labels once `with_labels` is set.
"""

import json
import multiprocessing
import tempfile
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from litdata import StreamingDataLoader, StreamingDataset, optimize
from litdata.streaming.downloader import get_downloader
from torch import Tensor
from torch.utils.data import Dataset

from diffusion.core.images import to_model_range
from diffusion.data.base import SPLITS, ImageDataModule
from diffusion.errors import UserError
from diffusion.files import written_whole

META = "diffusion.json"  # beside train/ and val/: what prepare.py wrote there
FORMAT = 1
_PREPARE = "write it with prepare.py (python prepare.py data=<the data> out=DIR), then set data.input_dir=DIR"


# the writers inherit the split in memory (a spawned one would import torch and Lightning again: ~10 s on 2 cores)
_START = "fork" if "fork" in multiprocessing.get_all_start_methods() else None


def is_remote(input_dir: str) -> bool:
    return "://" in input_dir


class _Item:
    """The function `optimize` maps over a split's indices: its uint8 image and its label (-1: none)."""

    def __init__(self, images: Dataset, labels: Tensor | None):
        self.images, self.labels = images, labels

    def __call__(self, index: int) -> dict:
        label = -1 if self.labels is None else int(self.labels[index])
        return {"image": self.images[index].contiguous(), "label": label}


def write_shards(module: ImageDataModule, out: str | Path, chunk_bytes: str, num_workers: int) -> dict:
    """Write `module`'s train and val splits as LitData chunks under `out` (whole or not at all); its record."""
    module.setup("fit")
    try:
        class_names = module.class_names
        labels = {split: module.labels(split) for split in SPLITS}
    except UserError:  # an image folder without class subfolders: images alone
        class_names, labels = None, {split: None for split in SPLITS}
    meta = {"format": FORMAT, "source": module.identity, "channels": module.channels,
            "image_size": module.image_size, "class_names": class_names,
            "labels": {s: None if labels[s] is None else labels[s].tolist() for s in SPLITS}}
    with written_whole(out) as tmp:
        tmp.mkdir()
        for split in SPLITS:
            images = module._split(split)
            optimize(fn=_Item(images, labels[split]), inputs=list(range(len(images))), output_dir=str(tmp / split),
                     chunk_bytes=chunk_bytes, num_workers=num_workers, verbose=False, keep_data_ordered=True,
                     start_method=_START)
        (tmp / META).write_text(json.dumps(meta) + "\n")
    return meta


def read_meta(input_dir: str) -> dict:
    """input_dir/diffusion.json (downloaded by LitData's own downloader for an s3:// URL); one line if absent."""
    where = input_dir.rstrip("/")
    try:
        if is_remote(where):
            with tempfile.TemporaryDirectory() as cache:
                local = Path(cache) / META
                get_downloader(where, cache, []).download_file(f"{where}/{META}", str(local))
                text = local.read_text()
        else:
            text = (Path(where).expanduser() / META).read_text()
        meta = json.loads(text)
    except (OSError, ValueError) as err:
        raise UserError(f"data.input_dir={input_dir} holds no shards of prepare.py ({META}: "
                        f"{type(err).__name__}); {_PREPARE}") from err
    if meta.get("format") != FORMAT:
        raise UserError(f"data.input_dir={input_dir}: {META} is format {meta.get('format')}, this version reads "
                        f"{FORMAT}; {_PREPARE}")
    return meta


def check_input_dir(input_dir: str, channels: int, image_size: int) -> dict:
    """The shards' record, after checking that both splits have a LitData index (local folders) and that their
    images have the configured shape."""
    meta = read_meta(input_dir)
    if not is_remote(input_dir):
        for split in SPLITS:
            if not (Path(input_dir).expanduser() / split / "index.json").is_file():
                raise UserError(f"data.input_dir={input_dir} has no LitData index {split}/index.json (an interrupted "
                                f"copy?); {_PREPARE}")
    if (meta["channels"], meta["image_size"]) != (channels, image_size):
        raise UserError(f"data.channels={channels} data.image_size={image_size}, but the shards in {input_dir} hold "
                        f"{meta['channels']}x{meta['image_size']}x{meta['image_size']} images; set "
                        f"data.channels={meta['channels']} data.image_size={meta['image_size']}")
    return meta


class _Shards(StreamingDataset):
    """One split's items as model inputs; flips drawn from (seed, epoch, index) alone, whichever worker reads."""

    def __init__(self, input_dir: str, *, shuffle: bool, seed: int, random_flip: bool, with_labels: bool,
                 raw: bool = False):
        # batch_decode=False: LitData's batched decode deserializes a window of neighbours for every shuffled item
        # (3x fewer images/s on the digits)
        super().__init__(input_dir, shuffle=shuffle, seed=seed, drop_last=shuffle, batch_decode=False)
        self.random_flip, self.with_labels, self.raw = random_flip, with_labels, raw

    def __getitem__(self, index):
        item = super().__getitem__(index)
        x = item["image"]  # (C, H, W) uint8
        if self.raw:
            return x
        i = getattr(index, "index", index)
        if self.random_flip and np.random.default_rng([self.seed, self.current_epoch, i]).random() < 0.5:
            x = x.flip(-1)
        x = to_model_range(x)
        return (x, torch.tensor(item["label"])) if self.with_labels else x


class _ShardImages(Dataset):
    """A split's uint8 (C, H, W) images by index (as the other data sets' splits), opened on first use."""

    def __init__(self, input_dir: str, size: int):
        self.input_dir, self.size, self._shards = input_dir, size, None

    def __len__(self) -> int:
        return self.size  # all of it, whatever this rank's share (LitData's own len is per rank under DDP)

    def __getitem__(self, index: int) -> Tensor:
        if self._shards is None:
            self._shards = _Shards(self.input_dir, shuffle=False, seed=0, random_flip=False, with_labels=False,
                                   raw=True)
        return self._shards[index]


class StreamingDataModule(ImageDataModule):
    """The shards prepare.py wrote into input_dir (a folder or an s3:// URL), streamed by LitData; the module
    docstring says how. Train and val are both streamed; `reference_images` reads the first val images."""

    name = "streaming"

    def __init__(self, *, input_dir: str, batch_size: int, num_workers: int, seed: int, random_flip: bool,
                 channels: int, image_size: int):
        """The arguments are a validated config's (check_input_dir has read input_dir's record)."""
        super().__init__(input_dir, batch_size, num_workers, False, seed, random_flip, channels=channels,
                         image_size=image_size, on_device=False)
        self.input_dir = input_dir if is_remote(input_dir) else str(Path(input_dir).expanduser().resolve())

    @cached_property
    def meta(self) -> dict:
        return check_input_dir(self.input_dir, self.channels, self.image_size)

    def _where(self) -> str:
        return f"in {self.input_dir}"

    def _source(self) -> str:
        return self.input_dir

    def _load_split(self, split: str) -> Dataset:
        return _ShardImages(f"{self.input_dir}/{split}", self.meta["source"]["size"][split])

    @property
    def class_names(self) -> list[str]:
        if self.meta["class_names"] is None:
            raise UserError(f"the shards in {self.input_dir} have no labels (their source, "
                            f"{self.meta['source']['name']}, had no classes); train unconditionally "
                            "(model.num_classes=null) or prepare them from labelled data")
        return self.meta["class_names"]

    def _load_labels(self, split: str) -> Tensor:
        self.class_names  # noqa: B018 (labelled shards only)
        return torch.tensor(self.meta["labels"][split], dtype=torch.long)

    @cached_property
    def identity(self) -> dict:
        """The source's name and fingerprint (the same images streamed or read from memory are the same data)."""
        return {**self.meta["source"], "root": self.input_dir}

    def train_dataloader(self) -> StreamingDataLoader:
        """This rank's share (LitData reads the process group), reshuffled each epoch; the last partial batch
        dropped. Lightning saves the loader's state_dict in each checkpoint and restores it on resume."""
        shards = _Shards(f"{self.input_dir}/train", shuffle=True, seed=self.seed, random_flip=self.random_flip,
                         with_labels=self.with_labels)
        return StreamingDataLoader(shards, batch_size=self.batch_size, num_workers=self.num_workers, drop_last=True,
                                   persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())

    def val_dataloader(self) -> StreamingDataLoader:
        shards = _Shards(f"{self.input_dir}/val", shuffle=False, seed=self.seed, random_flip=False,
                         with_labels=self.with_labels)
        return StreamingDataLoader(shards, batch_size=self.batch_size, num_workers=self.num_workers,
                                   pin_memory=torch.cuda.is_available())
