"""The bundled digits, MNIST, Fashion-MNIST and CIFAR-10 (their files read and checked by data/readers.py)."""

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset
from torchvision import datasets

from diffusion.data.base import SPLIT_SEED, ImageDataModule, _Images, require_files
from diffusion.data.readers import REFETCH, read_cifar_batch, read_idx
from diffusion.errors import UserError

# The release's batches.meta label_names, in index order.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def load_digits_split(split: str, val_size: int = 297) -> tuple[torch.Tensor, torch.Tensor]:
    """A split of scikit-learn's 1,797 8x8 digits: uint8 (N, 1, 8, 8) images (0..16 -> round(x * 255 / 16))
    and int64 (N,) labels. The val split (val_size images, stratified by digit) is fixed by SPLIT_SEED."""
    digits = load_digits()
    images = np.rint(digits.images * 255 / 16).astype(np.uint8)  # (1797, 8, 8)
    train_idx, val_idx = train_test_split(np.arange(len(images)), test_size=val_size, stratify=digits.target,
                                          random_state=SPLIT_SEED)
    index = np.sort(train_idx if split == "train" else val_idx)
    return torch.from_numpy(images[index]).unsqueeze(1), torch.from_numpy(digits.target[index]).long()


class DigitsDataModule(ImageDataModule):
    """scikit-learn's 1,797 bundled 8x8 grey digits (never downloaded): 1,500 train, 297 val by default.

    The val split is fixed by SPLIT_SEED, whatever the training seed. Nothing is read from disk or
    downloaded. No flips: a mirrored digit is another symbol. Scored by the digits classifier's features.
    """

    name = "digits"
    quality_extractor = "digits"
    fixed_shape = ("channels", "image_size")  # 1×8×8 (config/validation.py also refuses random_flip=true)

    def __init__(self, *, batch_size: int, num_workers: int, seed: int, random_flip: bool, val_size: int,
                 channels: int, image_size: int, on_device: bool | None):
        super().__init__("", batch_size, num_workers, False, seed, random_flip, channels=channels,
                         image_size=image_size, on_device=on_device)
        self.val_size = val_size

    def _where(self) -> str:
        return "in scikit-learn's load_digits"

    def _source(self) -> str:
        return "scikit-learn's load_digits"

    def _load_split(self, split: str) -> Dataset:
        return _Images(load_digits_split(split, self.val_size)[0])

    def _load_labels(self, split: str) -> torch.Tensor:
        return load_digits_split(split, self.val_size)[1]

    @property
    def class_names(self) -> list[str]:
        return [str(k) for k in range(10)]


class MNISTDataModule(ImageDataModule):
    """MNIST through torchvision (root/MNIST/raw/*-ubyte): train = the 60k train set, val = the 10k test set.

    The 28x28 digits are padded with `(image_size - 28) / 2` pixels of background (0) on each side rather
    than resized, so pixel values stay exactly as stored; the default 32 lets the U-Net halve it 3 times.
    """

    name = "MNIST"
    dataset_class = datasets.MNIST
    classes = tuple(str(k) for k in range(10))
    fixed_shape = ("channels",)  # grey; image_size >= 28 (the schema's rule) pads them

    def __init__(self, *, root: str, batch_size: int, num_workers: int, download: bool, seed: int,
                 random_flip: bool, image_size: int, channels: int, on_device: bool | None):
        super().__init__(root, batch_size, num_workers, download, seed, random_flip,
                         channels=channels, image_size=image_size, on_device=on_device)
        self._labels_read: dict[str, torch.Tensor] = {}

    def _fetch(self) -> None:
        for train in (True, False):
            self.dataset_class(self.root, train=train, download=True)

    def _load_split(self, split: str) -> Dataset:
        prefix = "train" if split == "train" else "t10k"
        raw = f"{self.dataset_class.__name__}/raw"
        files = [f"{raw}/{prefix}-images-idx3-ubyte", f"{raw}/{prefix}-labels-idx1-ubyte"]
        require_files(self.name, self.root, files)
        images = read_idx(self.root / files[0], "images", self.name)  # (N, 28, 28)
        n_labels = len(read_idx(self.root / files[1], "labels", self.name))
        if images.shape[1:] != (28, 28) or n_labels != len(images):
            raise UserError(f"{self.name} files {self.root / files[0]} and its labels hold {tuple(images.shape)} "
                            f"images and {n_labels} labels, not N 28x28 images and N labels; {REFETCH}")
        self._labels_read[split] = read_idx(self.root / files[1], "labels", self.name).long()
        before = (self.image_size - 28) // 2
        after = self.image_size - 28 - before
        return _Images(torch.nn.functional.pad(images.unsqueeze(1), (before, after, before, after), value=0))


    def _load_labels(self, split: str) -> torch.Tensor:
        self._split(split)  # reads the labels beside the images
        return self._labels_read[split]

    @property
    def class_names(self) -> list[str]:
        return list(self.classes)


class FashionMNISTDataModule(MNISTDataModule):
    """Fashion-MNIST (root/FashionMNIST/raw/*-ubyte), laid out and padded exactly like MNIST."""

    name = "Fashion-MNIST"
    dataset_class = datasets.FashionMNIST
    classes = tuple(datasets.FashionMNIST.classes)  # "T-shirt/top", "Trouser", ...


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 (root/cifar-10-batches-py/): train = data_batch_1..5 (50k), val = test_batch (10k), 32x32x3.

    Random horizontal flips on train are the paper's only augmentation (Ho et al. 2020, Appendix B).
    """

    name = "CIFAR-10"
    eval_num_samples = 50_000  # Ho et al. 2020: FID and IS of 50,000 samples
    fixed_shape = ("channels", "image_size")  # 3×32×32

    def __init__(self, *, root: str, batch_size: int, num_workers: int, download: bool, seed: int,
                 random_flip: bool, channels: int, image_size: int, on_device: bool | None):
        super().__init__(root, batch_size, num_workers, download, seed, random_flip, channels=channels,
                         image_size=image_size, on_device=on_device)
        self._labels_read: dict[str, torch.Tensor] = {}

    def _fetch(self) -> None:
        for train in (True, False):
            datasets.CIFAR10(self.root, train=train, download=True)

    def _load_split(self, split: str) -> Dataset:
        files = datasets.CIFAR10.train_list if split == "train" else datasets.CIFAR10.test_list
        relpaths = [f"{datasets.CIFAR10.base_folder}/{name}" for name, _ in files]
        require_files(self.name, self.root, relpaths)
        batches = [read_cifar_batch(self.root / relpath, with_labels=True) for relpath in relpaths]
        self._labels_read[split] = torch.from_numpy(np.concatenate([labels for _, labels in batches]))
        return _Images(torch.from_numpy(np.concatenate([images for images, _ in batches])))  # (N, 3, 32, 32)

    def _load_labels(self, split: str) -> torch.Tensor:
        self._split(split)  # reads the labels beside the images
        return self._labels_read[split]

    @property
    def class_names(self) -> list[str]:
        return list(CIFAR10_CLASSES)
