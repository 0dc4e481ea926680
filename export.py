"""Export a trained model for diffusers: python export.py ckpt=PATH out=DIR [weights=ema|raw]."""

import sys

import hydra
from omegaconf import DictConfig

from diffusion.cli import guarded, precheck


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig):
    from diffusion import run

    return guarded(run.export, cfg)


if __name__ == "__main__":
    precheck("export", sys.argv[1:])
    main()
