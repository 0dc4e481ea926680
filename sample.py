"""Sample a trained model: python sample.py ckpt=PATH [num_samples=N] [sampler.name=ddim] [sampler.steps=K]."""

import sys

import hydra
from omegaconf import DictConfig

from diffusion.cli import guarded, precheck


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig):
    from diffusion import run

    return guarded(run.sample, cfg)


if __name__ == "__main__":
    precheck("sample", sys.argv[1:])
    main()
