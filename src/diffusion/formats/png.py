"""PNG grids of images in the model range [-1, 1]: written whole or not at all."""

from pathlib import Path

import torch
from torch import Tensor
from torchvision.utils import make_grid, save_image

from diffusion.core.images import to_unit
from diffusion.files import written_whole


def image_grid(x: Tensor, nrow: int | None = None, min_size: int = 32, pad_value: float = 0.0) -> Tensor:
    """(N, C, H, W) in [-1, 1] -> one (C, H', W') grid in [0, 1], nrow columns (default about √N).

    Images smaller than min_size are enlarged by nearest-neighbour repetition (8×8 digits show at 32×32,
    pixels kept sharp).
    """
    factor = -(-min_size // x.shape[-1])  # ceil
    x = to_unit(x).cpu()
    if factor > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=factor, mode="nearest")
    return make_grid(x, nrow=nrow or max(1, round(len(x) ** 0.5)), padding=2, pad_value=pad_value)


def side_by_side(grids: list[Tensor]) -> Tensor:
    """Grids in [0, 1] placed left to right with a white gap (raw | EMA)."""
    return make_grid(torch.stack(grids), nrow=len(grids), padding=4, pad_value=1.0)


def save_png(image: Tensor, path: Path) -> Path:
    """A (C, H, W) image in [0, 1] as a PNG, creating the folder; written whole or not at all (a temporary
    file renamed), so a run stopped mid-write never leaves a truncated PNG under the final name."""
    with written_whole(path) as tmp:
        save_image(image, tmp)
    return Path(path)


def save_grid(x: Tensor, path: Path, nrow: int | None = None, min_size: int = 32, pad_value: float = 0.0) -> Path:
    """(N, C, H, W) in [-1, 1] -> a PNG grid of nrow columns (see image_grid)."""
    return save_png(image_grid(x, nrow, min_size, pad_value), path)


def save_rows(rows: Tensor, path: Path, min_size: int = 32) -> Path:
    """(R, N, C, H, W) in [-1, 1] -> a PNG of R rows of N images on white."""
    return save_grid(rows.flatten(0, 1), path, rows.shape[1], min_size, pad_value=1.0)
