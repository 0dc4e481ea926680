"""The U-Net of Ho et al. 2020 and its layers: (x_t, t) -> prediction, nothing about schedules."""

from diffusion.nn.unet import CONFIGS, UNet, unet_config

__all__ = ["CONFIGS", "UNet", "unet_config"]
