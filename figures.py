"""The paper's figures of a trained model: python figures.py ckpt=PATH [data=digits] [output_dir=DIR] [num_images=N]."""

import sys

import hydra
from omegaconf import DictConfig

from diffusion.cli import guarded, precheck


@hydra.main(version_base="1.3", config_path="conf", config_name="figures")
def main(cfg: DictConfig):
    from diffusion import run

    return guarded(run.figures, cfg)


if __name__ == "__main__":
    precheck("figures", sys.argv[1:])
    main()
