"""Train a DDPM: python train.py [experiment=digits] [group=option] [key=value] ... (-m to sweep)."""

import sys

import hydra
from omegaconf import DictConfig

from diffusion.cli import guarded, precheck


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig):
    from diffusion import run  # imported here so that `--help` and config errors stay fast

    # The value of cfg.optimized_metric (what a sweeper such as Optuna optimizes), else None.
    return guarded(lambda c: run.objective(c, run.train(c)), cfg)


if __name__ == "__main__":
    precheck("train", sys.argv[1:])
    main()
