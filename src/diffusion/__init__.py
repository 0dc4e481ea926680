"""DDPM (Ho, Jain, Abbeel 2020) training framework: the math, the U-Net, and Lightning/Hydra glue."""

__version__ = "0.1.0"
