"""Where weights come from: a training checkpoint (.ckpt) or a local diffusers folder, told apart before reading."""

from pathlib import Path

from diffusion.errors import UserError

EXAMPLE = "e.g. outputs/<name>/<time>/checkpoints/last.ckpt"
DIFFUSERS_FILES = ("model_index.json", "unet/config.json", "config.json")


def check_source(source, key: str = "ckpt") -> Path:
    """A path that exists and is a file (a checkpoint, checked when read) or a diffusers folder; else one line."""
    path = Path(source)
    if not path.exists():
        raise UserError(f"{key} {source} does not exist; give a .ckpt file from a training run ({EXAMPLE}) or a "
                        "local diffusers folder (written by save_pretrained)")
    if path.is_dir() and not any((path / name).is_file() for name in DIFFUSERS_FILES):
        raise UserError(f"{key} {source} is a directory but not a diffusers folder (no {', '.join(DIFFUSERS_FILES)}); "
                        f"give a .ckpt file, e.g. {path / 'last.ckpt'}, or a folder written by save_pretrained")
    return path
