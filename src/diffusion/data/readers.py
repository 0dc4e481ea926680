"""The released files of MNIST and CIFAR-10, read and checked: a damaged file is named in one line.

MNIST: idx files (big-endian magic 0x00000803 for images, 0x00000801 for labels, then the sizes, then
uint8 values), checked against their header and read by torchvision's reader. CIFAR-10 (python version):
each batch is a pickled dict whose "data" is a uint8 (N, 3072) array, 1024 R then G then B values per
image, row-major. A file that is cut off, garbled or of another kind raises a `UserError` naming it and the
fix, before training starts. (Garbled pixel values in a well-formed file cannot be seen here;
data.download=true compares CIFAR-10's files with the release's md5 sums and fetches damaged ones again.)
"""

import math
import pickle
import struct
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets.mnist import read_image_file, read_label_file

from diffusion.errors import UserError

REFETCH = "delete it and run again with data.download=true (or put an intact copy there)"
_IDX = {"images": (0x803, 3), "labels": (0x801, 1)}  # kind -> (magic number, dimensions)


def read_idx(path: Path, kind: str, name: str = "MNIST") -> torch.Tensor:
    """An idx file of `kind` ("images": uint8 (N, H, W), "labels": (N,)), its header checked first."""
    magic, ndim = _IDX[kind]
    with open(path, "rb") as f:
        header = f.read(4 + 4 * ndim)
    found = int.from_bytes(header[:4], "big")
    if len(header) >= 4 and found != magic:
        raise UserError(f"{name} {kind} file {path} starts with the magic number 0x{found:08x}, not 0x{magic:08x}: "
                        f"it is not an idx {kind} file, or is corrupt; {REFETCH}")
    size = path.stat().st_size
    if len(header) < 4 + 4 * ndim:
        raise UserError(f"{name} {kind} file {path} is truncated ({size} bytes, shorter than its header); {REFETCH}")
    shape = struct.unpack(f">{ndim}I", header[4:])
    expected = len(header) + math.prod(shape)
    if size != expected:
        raise UserError(f"{name} {kind} file {path} has {size:,} bytes, but its header announces {shape} values "
                        f"({expected:,} bytes): it is truncated or corrupt; {REFETCH}")
    return read_image_file(str(path)) if kind == "images" else read_label_file(str(path))


def read_cifar_batch(path: Path, with_labels: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch -> uint8 (N, 3, 32, 32) (and with_labels: its int64 (N,) labels), or a
    UserError naming the file."""
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="latin1")  # the release was pickled by Python 2
    except Exception as err:  # a cut-off or garbled pickle fails in any of pickle's many ways
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")
        raise UserError(f"CIFAR-10 batch {path} is truncated or corrupt ({reason}); {REFETCH}") from err
    data = batch.get("data") if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise UserError(f"{path} is not a CIFAR-10 batch: it holds {_describe(batch)}, where a dict whose 'data' "
                        f"is a uint8 array of shape (N, 3072) belongs; {REFETCH}")
    if not with_labels:
        return data.reshape(-1, 3, 32, 32)
    labels = np.asarray(batch.get("labels", []))
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{path} holds {len(data)} CIFAR-10 images but its 'labels' are {labels.size} values of "
                        f"type {labels.dtype}, not one integer per image; {REFETCH}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _describe(obj) -> str:
    if not isinstance(obj, dict):
        return f"a {type(obj).__name__}"
    if "data" not in obj:
        return f"a dict with keys {sorted(map(str, obj))[:6]}"
    data = obj["data"]
    if isinstance(data, np.ndarray):
        return f"'data' of dtype {data.dtype} and shape {data.shape}"
    return f"'data' of type {type(data).__name__}"
