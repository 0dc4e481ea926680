"""Evaluate a checkpoint: python evaluate.py ckpt=PATH [num_samples=N] [sampler.name=ddim sampler.steps=50]."""

import sys

import hydra
from omegaconf import DictConfig

from diffusion.cli import guarded, precheck


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig):
    from diffusion import run

    return guarded(run.evaluate, cfg)


if __name__ == "__main__":
    precheck("evaluate", sys.argv[1:])
    main()
