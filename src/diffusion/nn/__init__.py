"""The paper's U-Net: (x_t, t) -> prediction; it knows nothing of schedules."""

from diffusion.nn.unet import UNet

__all__ = ["UNet"]
