"""Files in and out: diffusers folders (UNet2DModel and schedulers) and PNG grids."""
