"""Image conversions between the model range [-1, 1], [0, 1] and uint8. Every conversion is here.

Data are 8-bit images mapped onto the 256-level grid in [-1, 1] (x / 127.5 - 1), the range the paper's
discretized decoder assumes (Ho et al. 2020, Sec. 3.3); samples go back to uint8 by the nearest level.
"""

import torch
from torch import Tensor


def to_model_range(images: Tensor) -> Tensor:
    """uint8 images -> float32 on the 256-level grid in [-1, 1]: x / 127.5 - 1, correctly rounded."""
    return (images.to(torch.float32) * 2 - 255) / 255  # exact integers, then a single rounding


def to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] -> uint8 at the nearest of the 256 levels: what a saved PNG of the sample holds."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def to_unit(x: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1], as image files and loggers take floats."""
    return ((x.float() + 1) / 2).clamp(0, 1)
