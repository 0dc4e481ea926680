"""Ranks 1..N-1 of a DDP job, started by `lightning.distributed.JobDDPStrategy`: python -m diffusion.run.worker CFG.

CFG is the job's resolved config, written by rank 0: the same run directory, run id and checkpoint.
"""

import sys

from omegaconf import OmegaConf

from diffusion.config import register_configs
from diffusion.run.commands.train import train
from diffusion.run.jobs.guard import guarded


def main(config_path: str) -> None:
    register_configs()
    guarded(train, OmegaConf.load(config_path))


if __name__ == "__main__":
    main(sys.argv[1])
