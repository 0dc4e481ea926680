"""LSUN's scene categories as released: one LMDB database per category and split, read record by record.

The release (Yu et al. 2015; fyu/lsun's download.py, unzipped) is `<root>/<category>_<split>_lmdb/`, e.g.
church_outdoor_train_lmdb and church_outdoor_val_lmdb: an LMDB environment whose keys are the images' ids (40
hex digits, as bytes) and whose values are encoded images (WebP in the release; JPEG or PNG in some copies),
as torchvision's `LSUN` reader reads them. The train split is the train database, val the released val
database. Every record is decoded once before training, as an image folder's files are (folder.py: what every
mode becomes, the pixel limit), and each image is center-cropped to a square and resized to image_size as there.
A missing database, a directory that is not one, or a record that cannot be used (named by its key) is one line.
"""

import hashlib
import os
from functools import cached_property
from itertools import islice
from pathlib import Path

import lmdb
import torch
from torch import Tensor
from torch.utils.data import Dataset

from diffusion.data.base import SPLITS, ImageDataModule
from diffusion.data.folder import image_problems, load_square
from diffusion.errors import UserError

CATEGORIES = ("bedroom", "bridge", "church_outdoor", "classroom", "conference_room", "dining_room", "kitchen",
              "living_room", "restaurant", "tower")
REFETCH = "fetch the database again (fyu/lsun's download.py) and unzip it there"
_SCAN_CHUNK = 256  # records decoded at a time by the scan (a category's train database does not fit in memory)
_OPEN: dict[str, tuple[int, lmdb.Environment]] = {}  # path -> (the process that opened it, its handle)


def database_path(root: Path, category: str, split: str) -> Path:
    """Where the release puts a category's split: root/<category>_<split>_lmdb."""
    return root / f"{category}_{split}_lmdb"


def open_database(path: Path) -> lmdb.Environment:
    """The database at `path`, read-only and without a lock file (the release may sit on a read-only disk). One
    handle per process, shared: LMDB refuses to open an environment twice in a process, and a handle must not be
    used across a fork, so a DataLoader worker closes the one it inherited and opens its own."""
    pid, env = _OPEN.get(str(path), (None, None))
    if pid != os.getpid():
        if env is not None:
            env.close()  # the parent's, in this forked child: without a lock file, only this process's copy
        env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, meminit=False)
        _OPEN[str(path)] = (os.getpid(), env)
    return env


def show_key(key: bytes) -> str:
    """A record's key as the release writes it (hex digits), any other byte escaped."""
    return key.decode("ascii", "backslashreplace")


class _Records(Dataset):
    """A database's records, decoded on demand as uint8 (C, size, size)."""

    def __init__(self, path: Path, keys: list[bytes], mode: str, size: int, max_pixels: int | None):
        self.path, self.keys, self.mode, self.size, self.max_pixels = path, keys, mode, size, max_pixels

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> Tensor:
        key = self.keys[index]
        with open_database(self.path).begin() as txn:
            value = txn.get(key)
        if value is None:
            raise UserError(f"record {show_key(key)} of LSUN database {self.path} is gone since the scan before "
                            f"training; {REFETCH}")
        return load_square(value, self.mode, self.size, self.max_pixels,
                           name=f"record {show_key(key)} of LSUN database {self.path}")


class LSUNDataModule(ImageDataModule):
    """One LSUN scene category (`category`): its train and val databases under `root`, as released.

    Each image is converted to RGB (channels=3) or L (channels=1), center-cropped to a square and resized to
    `image_size` (bicubic), as an image folder's. Records that cannot be used (unreadable, over
    `max_image_pixels`) are reported before training starts. Its one class is the category.
    """

    name = "LSUN"

    def __init__(self, *, root: str, batch_size: int, num_workers: int, seed: int, random_flip: bool,
                 image_size: int, channels: int, category: str, max_image_pixels: int | None):
        super().__init__(root, batch_size, num_workers, False, seed, random_flip,
                         channels=channels, image_size=image_size, on_device=False)
        self.category, self.max_image_pixels = category, max_image_pixels
        self.name = f"LSUN {category}"  # what a checkpoint records: another category is other data

    @cached_property
    def _scanned(self) -> dict[str, tuple[list[bytes], str]]:
        """Each split's keys (in the database's order) and a digest of its keys and record sizes, after checking
        that both databases exist and that every record can be used."""
        root = self.root.resolve()
        if not root.is_dir():
            raise UserError(f"LSUN folder {root} does not exist; set data.root=PATH to the folder holding "
                            f"{self.category}_train_lmdb and {self.category}_val_lmdb (as the release unzips)")
        for split in SPLITS:
            path = database_path(root, self.category, split)
            if not path.is_dir():
                found = sorted(p.name for p in root.glob("*_lmdb") if p.is_dir())
                raise UserError(f"data.category={self.category}: no database {path.name} under {root} (expected "
                                f"{path}); databases found there: {', '.join(found) or 'none'}; set data.category "
                                f"to a category found there, or data.root=PATH to the folder holding {path.name}")
        return {split: self._scan(database_path(root, self.category, split)) for split in SPLITS}

    def _scan(self, path: Path) -> tuple[list[bytes], str]:
        """Every key of one database and a digest of its keys and sizes, every record decoded once."""
        keys, digest, bad, first = [], hashlib.sha256(), 0, None
        try:
            with open_database(path).begin() as txn:
                records = txn.cursor().iternext()
                while chunk := list(islice(records, _SCAN_CHUNK)):
                    problems = image_problems([value for _, value in chunk], self.max_image_pixels,
                                              self.num_workers, REFETCH)
                    for (key, value), why in zip(chunk, problems, strict=True):
                        keys.append(key)
                        digest.update(key + f" {len(value)}\n".encode())
                        if why:
                            bad, first = bad + 1, first or (key, why)
        except lmdb.Error as err:
            raise UserError(f"LSUN database {path} cannot be opened ({type(err).__name__}: {err}): it is not an "
                            f"LMDB database, or is damaged; {REFETCH}") from err
        if first:
            raise UserError(f"{bad} of {len(keys)} records of LSUN database {path} cannot be used, first key "
                            f"{show_key(first[0])}: {first[1]}")
        if not keys:
            raise UserError(f"LSUN database {path} has 0 records; {REFETCH}")
        return keys, digest.hexdigest()

    def _fingerprint(self) -> str:
        """sha256 of each split's database name, keys and record sizes (the scan has read every record)."""
        digest = hashlib.sha256()
        for split in SPLITS:
            digest.update(f"{split} {self.category}_{split}_lmdb {self._scanned[split][1]}\n".encode())
        return digest.hexdigest()[:16]

    @property
    def class_names(self) -> list[str]:
        return [self.category]

    def _load_labels(self, split: str) -> Tensor:
        return torch.zeros(len(self._scanned[split][0]), dtype=torch.long)

    def _load_split(self, split: str) -> Dataset:
        return _Records(database_path(self.root.resolve(), self.category, split), self._scanned[split][0],
                        "RGB" if self.channels == 3 else "L", self.image_size, self.max_image_pixels)
