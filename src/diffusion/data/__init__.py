"""LightningDataModules: scikit-learn digits (the default), MNIST, Fashion-MNIST, CIFAR-10, a folder of images, LSUN,
and LitData shards of any of them (data/streaming.py)."""

from diffusion.data.base import SPLIT_SEED, SPLITS, ImageDataModule, describe_data, require_files, same_data
from diffusion.data.datasets import (
    CIFAR10DataModule,
    DigitsDataModule,
    FashionMNISTDataModule,
    MNISTDataModule,
    load_digits_split,
)
from diffusion.data.folder import ImageFolderDataModule, find_images, image_problem, load_square, to_channels
from diffusion.data.loader import EpochSampler, ResumableLoader
from diffusion.data.lsun import LSUNDataModule
from diffusion.data.streaming import StreamingDataModule, check_input_dir, write_shards

__all__ = ["CIFAR10DataModule", "DigitsDataModule", "EpochSampler", "FashionMNISTDataModule", "ImageDataModule",
           "ImageFolderDataModule", "LSUNDataModule", "MNISTDataModule", "ResumableLoader", "SPLITS", "SPLIT_SEED",
           "StreamingDataModule", "check_input_dir", "describe_data", "find_images", "image_problem",
           "load_digits_split", "load_square", "require_files", "same_data", "to_channels", "write_shards"]
