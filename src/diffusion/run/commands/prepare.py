"""prepare(cfg): a data set's train and val splits written once as LitData shards (data/streaming.py)."""

from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from diffusion.config.validation import check_prepare
from diffusion.data import write_shards


def prepare(cfg: DictConfig) -> Path:
    """Write cfg.out/train, cfg.out/val (LitData chunks of uint8 images and labels) and cfg.out/diffusion.json,
    whole or not at all; print the data.* overrides that train from them."""
    check_prepare(cfg)
    module = instantiate(cfg.data)
    meta = write_shards(module, cfg.out, f"{cfg.chunk_mb}MB", cfg.num_workers)
    out = Path(cfg.out).expanduser().resolve()
    size = "+".join(str(n) for n in meta["source"]["size"].values())
    print(f"prepared: {out} ({meta['source']['name']}, {size} train+val images); train from it with data=streaming "
          f"data.input_dir={out} data.channels={meta['channels']} data.image_size={meta['image_size']}")
    return out
